"""CLIP BPE tokenizer exactly as Stable Diffusion 2.x uses it, built on the `tokenizers` library.

This is OpenAI's simple_tokenizer.py (github.com/openai/CLIP, MIT), which OpenCLIP copies and SD 2.x
was trained with: same vocabulary file, same normalisation (HTML unescape twice, whitespace
collapse, lowercase), same pre-tokenising regex, same byte-level BPE with "</w>" word ends.

ftfy.fix_text, which OpenAI and OpenCLIP run first, is not applied: it repairs mojibake, curly
quotes, full-width characters and ligatures, which typed prompts rarely contain. We do its final
step, NFC normalisation (transformers' CLIPTokenizer does too), so composed and decomposed accents
tokenize alike.

Differences from transformers' CLIPTokenizer as SD 2.x configures it (pad_token "!"):
- deliberate: a literal "!" is ordinary punctuation, "!</w>" = 256 ("!!" is one token), as in
  OpenCLIP. transformers matches "!" as its pad token, so every "!" in a prompt becomes id 0.
- HTML entities ("&amp;", "&quot;") are unescaped as OpenAI does; transformers keeps them as text.
- lowercasing is Python's str.lower(), as OpenAI's: a word-final "Σ" becomes "ς"; transformers'
  Rust normaliser lowercases character by character and gives "σ".
- rarer still: transformers keeps the separators \x1c-\x1f at the ends of a prompt (OpenAI's
  strip() drops them); Python, Oniguruma and Rust disagree on Unicode-version details (whether
  a recent code point is a letter, the canonical order of recent combining marks).
"""

import gzip
import html
import itertools
import unicodedata
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer
from tokenizers.models import BPE

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# simple_tokenizer.py's `pat`: special tokens, English contractions, letter runs, single digits,
# runs of other symbols. Whitespace matches nothing and so disappears.
SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
         r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's byte -> printable character table (GPT-2 encoder.py, CLIP simple_tokenizer.py)."""
    # BPE runs on strings, but we want it to see bytes, so every byte 0..255 gets a character that
    # stands for it. Bytes that already look fine keep their own character: 33 is chr(33) = "!".
    # The rest (control codes, space, ...) would be invisible or confusing, so they are shifted to
    # the first unused code points from 256 on: 0 becomes "Ā" (chr(256)) and space (32) becomes
    # "Ġ" (chr(288)). A one-to-one map of bytes to characters that "look nice" (see minGPT bpe.py).
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab(path: Path = VOCAB_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49,408-token vocabulary and 48,894 merges, built as simple_tokenizer.py builds them."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clean(text: str) -> str:
    """simple_tokenizer.py's basic_clean and lower(), with NFC standing in for ftfy."""
    # Python's strip() and lower() are OpenAI's: strip() also drops the ASCII separators \x1c-\x1f,
    # which are not \s, and lower() turns a word-final capital sigma into "ς".
    return unicodedata.normalize("NFC", html.unescape(html.unescape(text))).strip().lower()


class Tokenizer:
    """Prompts -> LongTensor [B, max_len] of CLIP token ids: BOS, text, EOS, then pad_id."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self, max_len: int = 77, pad_id: int = 0):
        self.max_len, self.pad_id = max_len, pad_id
        self._bpe = BPETokenizer(BPE(*clip_vocab(), end_of_word_suffix="</w>"))
        # whitespace_clean runs here, not in clean(): Oniguruma's \s is that of the `regex` module
        # OpenAI used; Python's re \s would also take \x1c-\x1f, which CLIP keeps as symbols.
        self._bpe.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> chars
        ])
        # simple_tokenizer.py's BPE cache maps these two strings straight to their ids.
        self._bpe.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                      for t in ("<|startoftext|>", "<|endoftext|>")])

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without BOS/EOS and without truncation."""
        return self._bpe.encode(clean(text)).ids

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """LongTensor [B, max_len]; a too-long prompt is cut (with a warning) to end in EOS."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        out = torch.full((len(prompts), self.max_len), self.pad_id, dtype=torch.long)
        keep = self.max_len - 2
        for row, prompt in enumerate(prompts):
            text = clean(prompt)
            enc = self._bpe.encode(text)
            if len(enc.ids) > keep:
                dropped = text[enc.offsets[keep][0]:]
                warnings.warn(f"prompt longer than {self.max_len} tokens; CLIP will not see the "
                              f"truncated part: {dropped!r}", stacklevel=2)
            ids = [self.bos_id, *enc.ids[:keep], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def _words(self, text: str) -> list[tuple[range, list[int], str]]:
        """(token indices, token ids, text) of every pre-tokenized word of cleaned `text`."""
        enc, words = self._bpe.encode(text), []
        for _, group in itertools.groupby(range(len(enc.ids)), key=lambda i: enc.word_ids[i]):
            idx = list(group)
            span = range(idx[0], idx[-1] + 1)
            words.append((span, enc.ids[span.start : span.stop],
                          text[enc.offsets[span.start][0] : enc.offsets[span.stop - 1][1]]))
        return words

    def word_indices(self, prompt: str, word: str) -> list[int]:
        """Positions in __call__'s row (BOS is 0) of every token of every occurrence of `word`."""
        words = self._words(clean(prompt))
        kept = [w for w in words if w[0].stop <= self.max_len - 2]  # the rest is truncated away
        target = [ids for _, ids, _ in self._words(clean(word))]
        n, found = len(target), []
        # Whole words only, compared word by word: "cat" is not in "cats" nor in "wildcat".
        for k in range(len(kept) - n + 1 if n else 0):
            if [ids for _, ids, _ in kept[k : k + n]] == target:
                found += [i + 1 for span, _, _ in kept[k : k + n] for i in span]  # BOS is 0
        if not found:
            where = f" within its first {self.max_len} tokens" if len(kept) < len(words) else ""
            raise ValueError(f"{word!r} not found in prompt {prompt!r}{where}; the words of the "
                             f"prompt are: {', '.join(text for _, _, text in kept)}")
        return found

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add whole-word tokens (textual inversion, e.g. "<sks-cat>"); returns their new ids."""
        new = [clean(t) for t in tokens]  # prompts are cleaned (lowercased) before matching
        for token, t in zip(tokens, new):
            if t.split() != [t]:
                raise ValueError(f"token {token!r} must be one word without whitespace")
            if self._bpe.token_to_id(t) is not None or new.count(t) > 1:
                raise ValueError(f"token {token!r} is already in the vocabulary (or given twice)")
        self._bpe.add_tokens([AddedToken(t, normalized=False) for t in new])
        return [self._bpe.token_to_id(t) for t in new]

    def __len__(self) -> int:
        """Vocabulary size including added tokens."""
        return self._bpe.get_vocab_size(with_added_tokens=True)
