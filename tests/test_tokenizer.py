"""Tokenizer parity with OpenAI's simple_tokenizer.py and with transformers' CLIPTokenizer.

Two oracles, both built here from the vendored vocabulary file: a transcription of OpenAI's
simple_tokenizer.py (what OpenCLIP, and so SD 2.x training, used) and transformers'
CLIPTokenizer configured as SD 2.x ships it (pad_token "!"), which diffusers' pipelines load.
"""

import html
import random
import unicodedata
import warnings

import pytest
import regex
import torch

from conftest import openai_bytes_to_unicode, openai_vocab

from sd.tokenizer import Tokenizer

MAX_LEN = 77
BOS, EOS = 49406, 49407


class OpenAITokenizer:
    """OpenAI's simple_tokenizer.py (github.com/openai/CLIP, MIT) without ftfy: NFC in its place."""

    def __init__(self):
        self.encoder, merges = openai_vocab()
        self.byte_encoder = openai_bytes_to_unicode()
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
            r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)  # the last step of ftfy.fix_text
        text = html.unescape(html.unescape(text)).strip()  # basic_clean
        text = regex.sub(r"\s+", " ", text).strip().lower()  # whitespace_clean, lower
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def row(self, text: str) -> list[int]:
        """open_clip.tokenize: SOT, ids, EOT, zero padding; too long -> cut, EOT forced last."""
        ids = ([BOS] + self.encode(text) + [EOS])[:MAX_LEN]
        ids[-1] = EOS
        return ids + [0] * (MAX_LEN - len(ids))


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
    assert tok.encode("<|startoftext|><|endoftext|>") == [BOS, EOS]


def test_prompt_sets_are_large_and_varied(openai):
    assert len(PLAIN) >= 150 and len(EVERYTHING) >= 200
    assert not any("!" in p or ("&" in p and ";" in p) or "Σ" in p for p in PLAIN)
    assert sum(len(openai.encode(p)) > MAX_LEN - 2 for p in PLAIN) >= 10  # truncated ones


def test_parity_with_openai_reference(tok, openai):
    for p in EVERYTHING:
        assert tok.encode(p) == openai.encode(p), p
    assert rows(tok, EVERYTHING) == [openai.row(p) for p in EVERYTHING]


def test_parity_with_transformers(tok, hf):
    ours, theirs = rows(tok, PLAIN), hf_rows(hf, PLAIN)
    for p, a, b in zip(PLAIN, ours, theirs):
        assert a == b, p


def test_sd1_padding_matches_transformers(hf_sd1):
    # SD 1.x pads with EOS; with that pad token transformers treats "!" as text, so even the
    # "!" prompts agree exactly.
    sd1 = Tokenizer(pad_id=EOS)
    prompts = PLAIN + EXCLAIM + EXCLAIM_RUNS
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
    with pytest.warns(UserWarning, match="in the style of monet") as record:
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


def test_separators_are_stripped_like_python(tok, hf, openai):
    # OpenAI strips with str.strip(), which drops \x1c-\x1f; inside a prompt they are symbols.
    for p in ("\x1ccat\x1f", "a\x1db", "\x1e"):
        assert tok.encode(p) == openai.encode(p), repr(p)
    assert tok.encode("\x1ccat\x1f") == tok.encode("cat")
    assert hf("\x1ccat", add_special_tokens=False).input_ids != tok.encode("cat")
    assert len(tok.encode("a\x1db")) == 3


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
