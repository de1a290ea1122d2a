"""A transcription of OpenAI's simple_tokenizer.py (github.com/openai/CLIP, MIT) as OpenCLIP
copies it: the oracle test_tokenizer.py compares ours with on random prompts ftfy leaves alone."""

import html
import unicodedata

import regex
from conftest import openai_bytes_to_unicode, openai_vocab

MAX_LEN = 77
BOS, EOS = 49406, 49407

# Characters that ftfy.fix_text's default fixes change into other non-space characters, read
# from ftfy 6.3's fixes.py and chardata.py: controls, C1 controls, curly quotes, deprecated
# format characters, ligatures, full-width forms, BOM and annotation characters, surrogates.
FTFY_CHANGES = regex.compile(
    "[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\u02bc\u2018-\u201f\u206a-\u206f\u0132\u0133\u0149"
    "\u01c4-\u01cc\u01f1-\u01f3\ufb00-\ufb06\uff01-\uffef\ufeff\ufff9-\ufffc\ud800-\udfff]")


class OpenAITokenizer:
    """OpenAI's simple_tokenizer.py (github.com/openai/CLIP, MIT) as OpenCLIP copies it.

    Without ftfy (NFC in its place: use it only on prompts FTFY_CHANGES does not match) and
    without special tokens: OpenCLIP renamed them, so OpenAI's "<|endoftext|>" is text there.
    """

    def __init__(self):
        self.encoder, merges = openai_vocab()
        self.byte_encoder = openai_bytes_to_unicode()
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {}
        self.pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)

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
        assert not FTFY_CHANGES.search(text), f"ftfy would change {text!r}: not for this oracle"
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
