"""Writes openclip_ids.json: OpenCLIP's token ids for a corpus of prompts. A test-only tool.

tests/test_tokenizer.py compares sd.tokenizer with the ids this wrote; it needs neither open_clip
nor ftfy. How openclip_ids.json was made (2026-11-30, Python 3.11, CPU torch from local wheels):

    python3 -m venv /tmp/oc
    /tmp/oc/bin/pip install ftfy regex torch==2.13.0 numpy        # ftfy 6.3.1, regex 2026.11.19
    /tmp/oc/bin/pip install --no-deps open_clip_torch             # open_clip_torch 3.3.0
    /tmp/oc/bin/python tests/data/make_openclip_ids.py            # from the repository root

Only open_clip/tokenizer.py is loaded (by path: the package's __init__ needs timm and
torchvision). SD 2.x was trained with open_clip 2.x and an ftfy of 2022; checked once by hand:
open_clip v2.7.0's tokenizer.py (from its git tag) gives the same rows on all cases, and ftfy 6.1.1
the same "fixed" text. (2.x's whitespace_clean uses the `regex` module's \\s where 3.3 uses
str.split; they differ only on \\x1c-\\x1f, which ftfy removes first.)

Each case records the prompt, ftfy.fix_text(prompt), OpenCLIP's encode() ids (no BOS/EOS, not
truncated) and its 77-id tokenize() row; where ftfy's mojibake repair changes the ids, also the row
with fix_text(..., fix_encoding=False), which sd.tokenizer implements.
"""

import functools
import importlib.util
import json
import site
import sys
import types
import unicodedata
from importlib.metadata import version
from pathlib import Path

import ftfy

ORDINARY = [
    "", "   ", "a photo of a cat", "A Photo Of A CAT",
    "an astronaut riding a horse on mars, digital art, 4k, trending on artstation",
    "Photorealistic Portrait, 85mm, f/1.8, bokeh, 8K UHD",
    "(masterpiece:1.2), [blurry], {detailed}", "<lora:foo:0.8>", "don't stop",
    "it's a dog's life", "DON'T SHOUT",
    "they're here, we've gone, I'm fine, you'll see, he'd go", "rock'n'roll at 5 o'clock",
    "1234567890", "3.14159 is pi", "#hashtag @user $100 50% a&b", "email@example.com",
    "path/to/file.png", "c++ && || ==", "~`^_|\\", 'quotes "like this"', "'single quotes'",
    "a cat!", "wow! amazing", "hi!!!", "what?!", "x!y", "ΟΔΟΣ", "Ελληνικά λέξεις", "русский текст",
    "日本語のテキスト", "中文提示词", "한국어 프롬프트",
]
CURLY_QUOTES = [
    "“a cat” on a ‘mat’", "it’s a dog’s life", "don’t stop", "‛reversed‟ quotes", "„German“",
    "‚low‘ single", "Hawaiʻi ʼokina", "«guillemets» ‹single›", "O’Neil’s “pub”", "“curly”" * 3,
]
FULL_WIDTH = [
    "ＡＢＣ", "ＬＯＵＤ　ＮＯＩＳＥＳ", "ａ　ｐｈｏｔｏ　ｏｆ　ａ　ｃａｔ！", "１９２０ｘ１０８０",
    "（ｍａｓｔｅｒｐｉｅｃｅ：１．２）", "ｶﾀｶﾅ halfwidth ﾊﾟ", "￥100 ￡5 ￠", "Ｈｅｌｌｏ，ｗｏｒｌｄ．",
    "＆ａｍｐ； full-width entity", "＜|endoftext|＞",
]
LIGATURES = [
    "ﬁne ligature", "ﬃ oﬃce", "ﬂower ﬀ ﬄ ﬅ ﬆ", "Ĳsselmeer ĳs", "ǅ ǈ ǋ Ǳ ǆ", "ŉ", "Æsir œuvre",
    "ﬁ" * 5,
]
SPECIAL_TOKENS = [
    "<|startoftext|>", "<|endoftext|>", "<|startoftext|>hello<|endoftext|>",
    "a cat<|endoftext|>a dog", "<|ENDOFTEXT|>", "&lt;|endoftext|&gt;",
    # OpenCLIP's own names for ids 49406/49407: matched in text (sd.tokenizer does not), and
    # the same words spaced out, which is how sd.tokenizer reads them.
    "<start_of_text>x", "<END_OF_TEXT>", "a <start_of_text> b <end_of_text> c",
    "< start_of_text > x", "< end_of_text >", "a < start_of_text > b < end_of_text > c",
]
HTML = [
    "fish &amp; chips", "&quot;quoted&quot;", "&lt;tag&gt;", "&amp;amp; twice", "it&#39;s",
    "&nbsp;gap", "AT&amp;T", "it&#x2019;s", "&ldquo;quoted&rdquo;", "&EACUTE;t&EACUTE;",
    "&amp;amp;amp;amp; four times", "this&not that", "&not", "&#128512; grin", "&#99999999; big",
    "&#39x;", "<b>bold</b> &amp; &ldquo;html&rdquo;", "it&#x2019;s\n<b>&amp;</b>",
    "<b>\nit&#x2019;s", "&ﬁlig;", "&#xFB01;ne", "&#65313;&#65314;", "e&#769;t&#233;",
]
ACCENTS = [
    "café crème brûlée", "cafe\u0301 decomposed", "naïve façade", "Ångström über straße",
    "İstanbul", "ΣΟΦΙΑ ΟΔΟΣ", "x² ½ ™ µ ℃", "Å vs A\u030a", "\u1e9b\u0323 dot",
]
EMOJI = [
    "emoji 🐱🐶 🎉", "👨‍👩‍👧 family", "🏳️‍🌈 flag", "wales 🏴\U000e0067\U000e0062\U000e0077\U000e006c"
    "\U000e0073\U000e007f", "❤️ heart", "a\ud83d\ude00b paired surrogates", "lone \udc80 surrogate",
]
WHITESPACE_AND_CONTROL = [
    "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "multiple     spaces",
    "\u3000ideographic\u3000space", "no\u00a0break space", "a\u2028b\u2029c", "a\x85b",
    "\x1ccat\x1f", "a\x1db", "zero\u200bwidth", "soft\u00adhyphen", "\ufeffBOM at start",
    "\x1b[31mred\x1b[0m text", "bell\x07 nul\x00 del\x7f", "\x93smart\x94 from cp1252",
    "\x80 euro and \x81 undefined",
    "\u206adeprecated", "ob\ufffcject", "form\x0cfeed", "vertical\x0btab", "\r\rcr only",
    "line one\nline two\n\n", "\u2003em\u2009thin\u202fspaces",
]
MOJIBAKE = ["cafÃ©", "Ã  la mode", "donâ€™t stop", "â€œquotedâ€\x9d"]
LONG = [
    "a painting of a lighthouse " * 20 + "in the style of monet", "“ultra detailed” " * 40,
    "ＡＢＣ " * 80, "ultra detailed " * 36 + "🐱🐱🐱", "ﬁne " * 100, "word " * 2000,
]
CORPUS = {"ordinary": ORDINARY, "curly_quotes": CURLY_QUOTES, "full_width": FULL_WIDTH,
          "ligatures": LIGATURES, "special_tokens": SPECIAL_TOKENS, "html": HTML,
          "accents": ACCENTS, "emoji": EMOJI, "whitespace_and_control": WHITESPACE_AND_CONTROL,
          "mojibake": MOJIBAKE, "long": LONG}


def load_openclip_tokenizer() -> types.ModuleType:
    path = Path(site.getsitepackages()[0]) / "open_clip" / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    oc = load_openclip_tokenizer()
    no_fix_encoding = types.SimpleNamespace(
        fix_text=functools.partial(ftfy.fix_text, fix_encoding=False))
    cases = []
    for category, prompts in CORPUS.items():
        for prompt in prompts:
            case = {"category": category, "prompt": prompt, "fixed": ftfy.fix_text(prompt),
                    "encode": oc._tokenizer.encode(prompt), "row": oc.tokenize(prompt)[0].tolist()}
            oc.ftfy = no_fix_encoding  # basic_clean looks ftfy up in its module at each call
            row = oc.tokenize(prompt)[0].tolist()
            oc.ftfy = ftfy
            if row != case["row"]:
                case["row_without_fix_encoding"] = row
            cases.append(case)
    out = {"open_clip_torch": version("open_clip_torch"), "ftfy": version("ftfy"),
           "python": sys.version.split()[0], "unicodedata": unicodedata.unidata_version,
           "cases": cases}
    path = Path(__file__).with_name("openclip_ids.json")
    # ASCII escapes: two prompts hold lone surrogates, which UTF-8 cannot store.
    path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()
                                       if k != "cases")
                    + ',\n"cases": [\n' + ",\n".join(json.dumps(c) for c in cases) + "\n]}\n")
    print(f"wrote {path}: {len(cases)} prompts")


if __name__ == "__main__":
    main()
