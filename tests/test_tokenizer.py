"""Tokenizer parity with OpenCLIP, OpenAI's simple_tokenizer.py and transformers' CLIPTokenizer.

Three oracles: OpenCLIP's own ids for a corpus of pasted and typed prompts, made once with
open_clip and ftfy (tests/data/openclip_ids.json, by tests/data/make_openclip_ids.py); a
transcription of OpenAI's simple_tokenizer.py as OpenCLIP copies it (what SD 2.x training used),
built here from the vendored vocabulary file, for random prompts that ftfy leaves alone; and
transformers' CLIPTokenizer configured as SD 2.x ships it (pad_token "!"), which diffusers'
pipelines load.
"""

import html
import json
import random
import warnings

import pytest
import torch
from conftest import DATA, openai_vocab
from openai_tokenizer import FTFY_CHANGES, OpenAITokenizer

from sd.tokenizer import Tokenizer, fix_text

MAX_LEN = 77
BOS, EOS = 49406, 49407


HANDWRITTEN = [
    "", "   ", "\n", "a photo of a cat", "A Photo Of A CAT", "a PhOtO oF a CaT",
    "an astronaut riding a horse on mars, digital art, 4k, trending on artstation",
    "don't stop", "it's a dog's life", "they're here, we've gone, I'm fine, you'll see, he'd go",
    "DON'T SHOUT", "IT'S", "rock'n'roll at 5 o'clock", "the cats' toys", "can't won't shan't",
    "1234567890", "3.14159 is pi", "year 2024, 16:9 aspect", "x1.5 zoom", "1st 2nd 3rd 4th",
    "hello, world.", "what?", "(masterpiece:1.2), [blurry], {detailed}", "a -- b ... c",
    "#hashtag @user $100 50% a&b", "<lora:foo:0.8>", 'quotes "like this"', "'single quotes'",
    "email@example.com", "path/to/file.png", "c++ && || ==", "~`^_|\\", "a_b-c.d,e;f:g",
    "café crème brûlée", "naïve façade", "Ångström über straße", "Ελληνικά λέξεις",
    "русский текст", "日本語のテキスト", "中文提示词", "한국어 프롬프트", "emoji 🐱🐶 🎉",
    "👨‍👩‍👧 family", "mañana", "cafe\u0301 decomposed", "İstanbul", "ﬁne ligature",
    "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "multiple     spaces",
    "\u3000ideographic\u3000space", "no\u00a0break space", "<|startoftext|>hello<|endoftext|>",
    "Photorealistic Portrait, 85mm, f/1.8, bokeh, 8K UHD",
    " ".join(["a"] * 100),
    "a very long prompt " * 20,
    "ultra detailed " * 36 + "🐱🐱🐱",  # truncation falls inside a multi-token emoji run
]
EXCLAIM = ["a cat!", "wow! amazing", "hi !", "! leading", "x!y", "a photo of a dog! 4k"]
EXCLAIM_RUNS = ["hi!!!", "what?!", "yes!!! no!", "wow!!" * 30]
HTML = ["fish &amp; chips", "&quot;quoted&quot;", "&lt;tag&gt;", "&amp;amp; twice", "it&#39;s",
        "&nbsp;gap", "AT&amp;T"]

POOL = ["cat", "Dog", "astronaut", "photo", "portrait", "café", "naïve", "日本", "🐱", "🎉",
        "don't", "it's", "4k", "1920x1080", "3.5", "(masterpiece:1.2)", "[blurry]", "O'Neil",
        "hyper-realistic", "oil painting", "...", "Ελλάδα", "москва", "straße", "#art", "100%",
        "e\u0301t\u00e9", "trending on artstation", "über", "“curly”", "ÆØÅ", "x²", "½", "a+b=c"]
SEPS = [" ", "  ", "\t", "\n", ", ", "", " , ", ". "]


def generated(n: int, seed: int, extra: list[str]) -> list[str]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        words = rng.choices(POOL + extra, k=rng.choice([1, 3, 8, 15, 30, 60]))
        words = [rng.choice([str.lower, str.upper, str.title, str])(w) for w in words]
        out.append("".join(w + rng.choice(SEPS) for w in words))
    return out


PLAIN = HANDWRITTEN + generated(100, 0, [])  # no "!", no HTML entity, no capital sigma
EVERYTHING = PLAIN + EXCLAIM + EXCLAIM_RUNS + HTML + generated(40, 1, ["!", "&amp;", "&quot;"])
# Those that the OpenAI transcription and transformers can judge: ftfy leaves them alone, and no
# literal "<|endoftext|>", which transformers takes for its special token.
UNFIXED = [p for p in EVERYTHING if not FTFY_CHANGES.search(p)]
PLAIN_UNFIXED = [p for p in PLAIN if p in UNFIXED and "<|" not in p]

OPENCLIP = json.loads((DATA / "openclip_ids.json").read_text())
CASES = {c["prompt"]: c for c in OPENCLIP["cases"]}
# OpenCLIP matches its own names for ids 49406/49407 in text; we BPE them as text, as OpenCLIP
# does with the same words spaced out (the corpus has both).
OPENCLIP_NAMES = {"<start_of_text>x": "< start_of_text > x", "<END_OF_TEXT>": "< end_of_text >",
                  "a <start_of_text> b <end_of_text> c": "a < start_of_text > b < end_of_text > c"}
MOJIBAKE = ["cafÃ©", "Ã  la mode", "donâ€™t stop", "â€œquotedâ€\x9d"]  # fix_encoding's: not ours


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf(hf_tokenizer):
    return hf_tokenizer


@pytest.fixture(scope="module")
def hf_sd1(vocab_files):
    """The same with SD 1.x's pad token "<|endoftext|>", under which "!" is plain text."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(*vocab_files, model_max_length=MAX_LEN)


@pytest.fixture(scope="module")
def openai():
    return OpenAITokenizer()


def hf_rows(hf, prompts: list[str]) -> list[list[int]]:
    return hf(prompts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids


def rows(tok, prompts: list[str]) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings are tested on their own
        return tok(prompts).tolist()


def test_vocabulary(tok, hf):
    encoder, _ = openai_vocab()
    assert len(tok) == len(encoder) == len(hf) == 49408
    assert tok._bpe.get_vocab() == encoder
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, 0)
    assert hf.pad_token_id == 0 and encoder["!"] == 0 and encoder["!</w>"] == 256


def test_special_ids_and_padding(tok, hf):
    out = tok("")
    assert out.dtype == torch.long and out.shape == (1, MAX_LEN)
    assert out[0].tolist() == [BOS, EOS] + [0] * (MAX_LEN - 2) == hf_rows(hf, [""])[0]
    assert tok(["a", "b c"]).shape == (2, MAX_LEN)


def test_prompt_sets_are_large_and_varied(openai):
    assert len(PLAIN) >= 150 and len(EVERYTHING) >= 200
    assert len(UNFIXED) >= 150 and len(PLAIN_UNFIXED) >= 100
    assert not any("!" in p or ("&" in p and ";" in p) or "Σ" in p for p in PLAIN)
    assert sum(len(openai.encode(p)) > MAX_LEN - 2 for p in PLAIN_UNFIXED) >= 10  # truncated ones
    categories = {c["category"] for c in OPENCLIP["cases"]}
    assert len(OPENCLIP["cases"]) >= 140 and len(CASES) == len(OPENCLIP["cases"])
    assert {"curly_quotes", "full_width", "ligatures", "special_tokens", "html", "accents",
            "emoji", "whitespace_and_control", "long", "ordinary"} <= categories
    assert sum(len(c["encode"]) > MAX_LEN - 2 for c in OPENCLIP["cases"]) >= 5


def test_parity_with_openclip(tok):
    # OpenCLIP's real ids, ftfy included, on pasted text: curly quotes, full width, ligatures,
    # literal "<|endoftext|>", HTML, control characters, long prompts, ordinary ones.
    checked = 0
    for p, case in CASES.items():
        if p in OPENCLIP_NAMES or p in MOJIBAKE:
            continue
        assert tok.encode(p) == case["encode"], p
        assert rows(tok, [p])[0] == case["row"], p
        checked += 1
    assert checked == len(CASES) - 7


def test_fix_text_equals_ftfy_without_mojibake_repair():
    for p, case in CASES.items():
        if p not in MOJIBAKE:
            assert fix_text(p) == case["fixed"], p
    assert fix_text("“ＬＯＵＤ”　ﬁsh") == '"LOUD" fish'


def test_mojibake_is_left_alone(tok):
    # The one ftfy fix we leave out (see fix_text): our ids are OpenCLIP's with ftfy's
    # fix_encoding off, and only the mojibake prompts of the corpus need that fix.
    assert [p for p, c in CASES.items() if "row_without_fix_encoding" in c] == MOJIBAKE
    for p in MOJIBAKE:
        assert fix_text(p) == p and CASES[p]["fixed"] != p
        assert rows(tok, [p])[0] == CASES[p]["row_without_fix_encoding"] != CASES[p]["row"], p


def test_no_text_injects_a_control_token(tok, hf):
    for p in ("<|startoftext|>", "<|endoftext|>", "a cat<|endoftext|>a dog", "&lt;|endoftext|&gt;",
              "＜|endoftext|＞", *OPENCLIP_NAMES):
        assert BOS not in tok.encode(p) and EOS not in tok.encode(p), p
    assert tok.encode("<|startoftext|>") == CASES["<|startoftext|>"]["encode"]  # OpenCLIP: text
    # transformers matches OpenAI's names as its special tokens (a difference from it) ...
    assert hf("<|endoftext|>", add_special_tokens=False).input_ids == [EOS]
    # ... and OpenCLIP its own names (a difference from it): we read them as their spaced-out
    # words, which OpenCLIP BPEs as text.
    for p, spaced in OPENCLIP_NAMES.items():
        assert EOS in CASES[p]["encode"] or BOS in CASES[p]["encode"], p
        assert tok.encode(p) == CASES[spaced]["encode"], p


def test_parity_with_openai_reference(tok, openai):
    for p in UNFIXED:
        assert tok.encode(p) == openai.encode(p), p
    assert rows(tok, UNFIXED) == [openai.row(p) for p in UNFIXED]


def test_parity_with_transformers(tok, hf):
    ours, theirs = rows(tok, PLAIN_UNFIXED), hf_rows(hf, PLAIN_UNFIXED)
    for p, a, b in zip(PLAIN_UNFIXED, ours, theirs):
        assert a == b, p


def test_ftfy_fixes_are_a_difference_from_transformers(tok, hf_sd1):
    # transformers' fast CLIPTokenizer applies NFC but none of ftfy's other fixes; given ftfy's
    # output it agrees (compared up to EOS with SD 1.x's pad token, under which "!" is text).
    pasted = [p for p, c in CASES.items() if "<|" not in c["fixed"]
              and c["category"] in ("curly_quotes", "full_width", "ligatures")]
    differ = 0
    for p, a in zip(pasted, rows(tok, pasted)):
        ours = a[: a.index(EOS) + 1]
        differ += ours != hf_sd1(p, truncation=True, max_length=MAX_LEN).input_ids
        assert ours == hf_sd1(CASES[p]["fixed"], truncation=True, max_length=MAX_LEN).input_ids, p
    assert differ >= 20
    assert hf_sd1("\x1ccat", add_special_tokens=False).input_ids != tok.encode("cat")


def test_sd1_padding_matches_transformers(hf_sd1):
    # SD 1.x pads with EOS; with that pad token transformers treats "!" as text, so even the
    # "!" prompts agree exactly.
    sd1 = Tokenizer(pad_id=EOS)
    prompts = PLAIN_UNFIXED + EXCLAIM + EXCLAIM_RUNS
    assert rows(sd1, prompts) == hf_rows(hf_sd1, prompts)
    short = Tokenizer(max_len=8)
    assert rows(short, ["a b", "a b c d e f g"]) == [[BOS, 320, 321, EOS, 0, 0, 0, 0],
                                                     [BOS, *short.encode("a b c d e f"), EOS]]


def test_exclamation_is_bpe_not_pad(tok, hf, hf_sd1):
    # The one deliberate difference: transformers' SD 2.x config turns every literal "!" into id
    # 0 (its pad token); OpenCLIP, which SD 2 was trained with, BPEs it ("!</w>" = 256).
    ours, theirs = rows(tok, EXCLAIM), hf_rows(hf, EXCLAIM)
    for p, a, b in zip(EXCLAIM, ours, theirs):
        assert 256 in a and a != b, p
        assert [0 if i == 256 else i for i in a] == b, p
    # Runs of "!" merge like any punctuation: one token for ours, one 0 per "!" for theirs.
    assert tok.encode("hello!!") == [3306, 748] and tok.encode("!!") == [748]
    assert hf("hello!!").input_ids == [BOS, 3306, 0, 0, EOS]
    # Otherwise equal: with a pad token that is not "!", transformers agrees up to EOS.
    for p, a in zip(EXCLAIM + EXCLAIM_RUNS, rows(tok, EXCLAIM + EXCLAIM_RUNS)):
        assert a[: a.index(EOS) + 1] == hf_sd1(p, truncation=True, max_length=MAX_LEN).input_ids, p


def test_html_entities_are_unescaped(tok, hf, openai):
    # OpenAI/OpenCLIP unescape HTML twice; transformers' fast tokenizer keeps entities as text.
    ours = rows(tok, HTML)
    assert ours == [openai.row(p) for p in HTML]
    assert ours == hf_rows(hf, [html.unescape(html.unescape(p)) for p in HTML])
    assert all(a != b for a, b in zip(ours, hf_rows(hf, HTML)))
    assert tok.encode("fish &amp; chips") == tok.encode("fish & chips")


def test_final_sigma_lowercases_like_python(tok, hf, openai):
    # str.lower() (OpenAI) knows Greek final sigma; tokenizers' Lowercase maps char by char.
    assert tok.encode("ΟΔΟΣ") == openai.encode("ΟΔΟΣ") == tok.encode("οδος")
    assert tok.encode("ΟΔΟΣ") != hf("ΟΔΟΣ", add_special_tokens=False).input_ids
    assert hf("ΟΔΟΣ", add_special_tokens=False).input_ids == tok.encode("οδοσ")


def test_truncation_warns_and_ends_with_eos(tok, hf):
    prompt = "a painting of a lighthouse " * 20 + "in the style of monet"
    with pytest.warns(UserWarning, match=r"CLIP will not see its last 30 tokens \(30 words\), from "
                                         r"'a painting of a lighthouse a painting of \.\.\.'$"
                      ) as record:
        out = tok(prompt)[0]
    assert record[0].filename == __file__  # stacklevel=2 points at the caller
    assert out[-1] == EOS and out[0] == BOS and (out != 0).all()
    assert out.tolist() == hf_rows(hf, [prompt])[0]
    assert out[1:-1].tolist() == tok.encode(prompt)[: MAX_LEN - 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("a" + " a" * (MAX_LEN - 3))  # exactly fits: BOS, 75 tokens, EOS
        with pytest.raises(UserWarning):
            tok("a" + " a" * (MAX_LEN - 2))


def test_long_prompt_warning_is_short(tok):
    # A pasted 2,000-word prompt: the warning gives the count and the first words, not 9 KB.
    prompt = "a painting of a lighthouse " * 399 + "in the style of monet"  # 2,000 words
    with pytest.warns(UserWarning) as record:
        tok(prompt)
    message = str(record[0].message)
    assert len(prompt) > 9000 and len(message) < 200
    assert message.endswith("CLIP will not see its last 1925 tokens (1925 words), from "
                            "'a painting of a lighthouse a painting of ...'")
    with pytest.warns(UserWarning) as record:  # one 9 KB "word" is cut too
        tok("a " * 80 + "x" * 9000)
    assert len(str(record[0].message)) < 200
    with pytest.raises(ValueError, match=r"not found in prompt 'a painting of a lighthouse a "
                                         r"painting of \.\.\.' within its first 77") as error:
        tok.word_indices(prompt, "monet")  # --heatmap monet: the same prompt in an error
    assert len(str(error.value)) < 700


def test_control_characters_are_removed_like_ftfy(tok):
    # ftfy's remove_control_chars drops \x1c-\x1f (which str.strip() would only strip at the
    # ends) and the other controls anywhere; OpenCLIP's ids are in the corpus.
    for p in ("\x1ccat\x1f", "a\x1db", "bell\x07 nul\x00 del\x7f", "\ufeffBOM at start"):
        assert tok.encode(p) == CASES[p]["encode"], repr(p)
    assert tok.encode("\x1ccat\x1f") == tok.encode("cat")
    assert tok.encode("a\x1db") == tok.encode("ab")
    assert tok.encode("\x1e") == [] and tok.encode("\x1b[1mbold\x1b[0m") == tok.encode("bold")


def test_word_indices(tok):
    p = "a photo of a cat"
    assert tok.word_indices(p, "cat") == [5]
    assert tok.word_indices(p, "Cat") == tok.word_indices("A Photo of a CAT", "cat") == [5]
    assert tok.word_indices(p, "a") == [1, 4]
    assert tok.word_indices("a cat and a cat, cat!", "cat") == [2, 5, 7]
    assert tok.word_indices("a teddy bear on a bench", "teddy bear") == [2, 3]
    assert tok.word_indices("a teddy bear on a bench", "  Teddy\nBEAR ") == [2, 3]
    assert tok.word_indices("the cat's toy", "cat's") == [2, 3]


def test_word_indices_multi_token_word(tok):
    p = "a photorealistic portrait"
    word_ids = tok.encode("photorealistic")
    assert len(word_ids) == 2  # BPE splits it: "photo", "realistic</w>"
    idx = tok.word_indices(p, "photorealistic")
    assert idx == [2, 3] and tok(p)[0, idx].tolist() == word_ids
    with pytest.raises(ValueError, match="not found in prompt"):
        tok.word_indices(p, "realistic")  # whole words only


def test_word_indices_errors(tok):
    with pytest.raises(ValueError, match=r"'dog' not found in prompt .*words of the prompt are: "
                                         r"a, photo, of, a, cat"):
        tok.word_indices("a photo of a cat", "dog")
    for word in ("cats", "photo cat", "", "  "):
        with pytest.raises(ValueError, match="not found in prompt"):
            tok.word_indices("a photo of a cat", word)
    long = "a painting of a lighthouse " * 20 + "with a dog"
    with pytest.raises(ValueError, match="not found in prompt .* within its first 77 tokens"):
        tok.word_indices(long, "dog")
    assert tok.word_indices(long, "lighthouse")[-1] <= MAX_LEN - 2
    assert tok.word_indices("a dog, " + long, "dog") == [2]  # the truncated one is left out


def test_add_tokens():
    tok = Tokenizer()
    assert tok.add_tokens(["<sks-cat>"]) == [49408] and len(tok) == 49409
    assert tok.encode("a photo of <sks-cat>, asleep") == [*tok.encode("a photo of"), 49408,
                                                           *tok.encode(", asleep")]
    assert tok.encode("<SKS-Cat>") == [49408]  # prompts are lowercased; so are added tokens
    assert tok("a <sks-cat>")[0, :4].tolist() == [BOS, 320, 49408, EOS]
    assert tok.word_indices("a photo of <sks-cat> on a sofa", "<sks-cat>") == [4]
    assert tok.add_tokens(["<tok-a>", "<tok-b>"]) == [49409, 49410] and len(tok) == 49411
    for bad in (["<sks-cat>"], ["cat</w>"], ["cat"], ["<|endoftext|>"], ["<x>", "<x>"], ["a b"]):
        with pytest.raises(ValueError):
            tok.add_tokens(bad)
    assert len(tok) == 49411  # failed calls add nothing
