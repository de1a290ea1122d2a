"""CLIP BPE tokenizer exactly as Stable Diffusion 2.x uses it, built on the `tokenizers` library.

The reference is OpenCLIP's tokenizer.py (github.com/mlfoundations/open_clip), a copy of OpenAI's
simple_tokenizer.py (github.com/openai/CLIP, MIT) with which SD 2.x was trained: same vocabulary
file, same cleaning (ftfy.fix_text, HTML unescape twice, whitespace collapse, lowercase), same
pre-tokenising regex, same byte-level BPE with "</w>" word ends. tests/data/openclip_ids.json holds
OpenCLIP's ids for a corpus of pasted and typed prompts; tests/test_tokenizer.py compares with it.

Differences from OpenCLIP (deliberate, tested):
- fix_text below is ftfy's without its mojibake repair (see its docstring): "cafÃ©" stays as it
  is, where ftfy guesses "café".
- no text injects a control token. OpenAI's "<|startoftext|>" is text in OpenCLIP too, but OpenCLIP
  matches its own names "<start_of_text>" and "<end_of_text>" in prompts; we BPE them as text.

Differences from transformers' CLIPTokenizer as SD 2.x configures it (pad_token "!"), all tested:
- a literal "!" is ordinary punctuation, "!</w>" = 256 ("!!" is one token), as in OpenCLIP.
  transformers matches "!" as its pad token, so every "!" in a prompt becomes id 0.
- ftfy's fixes: curly quotes, full-width forms, Latin ligatures, C1 and other control characters
  (transformers' fast tokenizer only applies NFC, so "“cat”" and "ﬁsh" give other ids).
- HTML entities ("&amp;", "&quot;") are unescaped as OpenCLIP does; transformers keeps them as text.
- "<|startoftext|>" and "<|endoftext|>" in a prompt are text; transformers gives 49406/49407.
- lowercasing is Python's str.lower(), as OpenCLIP's: a word-final "Σ" becomes "ς"; transformers'
  Rust normaliser lowercases character by character and gives "σ".
Untested because no example is stable: Python, Oniguruma and Rust disagree on Unicode-version
details (whether a recent code point is a letter, the canonical order of recent combining marks).
"""

import gzip
import html
import itertools
import re
import unicodedata
import warnings
from html.entities import html5
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BPETokenizer
from tokenizers.models import BPE

VOCAB_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# simple_tokenizer.py's `pat` without its special tokens: English contractions, letter runs, single
# digits, runs of other symbols. Whitespace matches nothing and so disappears.
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# ftfy 6.3 fixes (ftfy/fixes.py, tables in ftfy/chardata.py), each a str.translate table or regex.
QUOTES = {0x2BC: "'", **dict.fromkeys(range(0x2018, 0x201C), "'"),
          **dict.fromkeys(range(0x201C, 0x2020), '"')}  # uncurl_quotes
LIGATURES = str.maketrans({  # fix_latin_ligatures: not "æ" or "œ", which are meant as letters
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"})
# fix_character_width: ideographic space and the Halfwidth and Fullwidth Forms block, by NFKC.
WIDTH = {0x3000: " "} | {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                         if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
# fix_c1_controls: U+80-U+9F are Latin-1 misreadings of Windows-1252 bytes ("\x93" is "“"); the
# five bytes Windows-1252 leaves undefined stay as they are (ftfy's "sloppy" codec).
C1 = {i: bytes([i]).decode("cp1252", "ignore") or chr(i) for i in range(0x80, 0xA0)}
# remove_control_chars: controls other than \t \n \f \r, deprecated format characters, BOM,
# interlinear annotation and object replacement characters.
CONTROL = dict.fromkeys([*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                         0xFEFF, *range(0xFFF9, 0xFFFD)])
LINE_BREAK = re.compile("\r\n?|[\u2028\u2029\x85]")  # fix_line_breaks: all become "\n"
ANSI = re.compile(r"\x1b\[[\d;]*[a-zA-Z]")  # remove_terminal_escapes
SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")  # fix_surrogates
SURROGATE = re.compile("[\ud800-\udfff]")
# unescape_html: only entities ending in ";" (so "this&not that" stays), numeric ones, and the
# upper-case spelling of lower-case names where that is not itself an entity ("&EACUTE;" = "É").
ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
ENTITIES = {"&" + n.upper(): c.upper() for n, c in html5.items() if n.endswith(";")
            and n == n.lower() and html.unescape("&" + n.upper()) == "&" + n.upper()}
ENTITIES |= {"&" + n: c for n, c in html5.items() if n.endswith(";")}


def unescape_entity(match: re.Match) -> str:
    """One HTML entity as ftfy's unescape_html decodes it; unknown ones stay as text."""
    entity = match.group(0)
    if entity in ENTITIES:
        return ENTITIES[entity]
    decoded = html.unescape(entity) if entity.startswith("&#") else entity
    return entity if ";" in decoded else decoded  # "&#39x;" is not a whole character reference


def join_surrogates(match: re.Match) -> str:
    """The character a UTF-16 surrogate pair encodes (text decoded as UCS-2 splits emoji so)."""
    high, low = map(ord, match.group(0))
    return chr(0x10000 + (high - 0xD800) * 0x400 + (low - 0xDC00))


def fix_text(text: str) -> str:
    """ftfy.fix_text with its default settings (ftfy 6.x, ftfy/__init__.py), less fix_encoding.

    Per line, and until nothing changes: unescape HTML entities (only until a line contains "<":
    ftfy then takes the text for HTML and keeps its entities), C1 controls as Windows-1252, Latin
    ligatures, full width, curly quotes, line breaks to "\n", UTF-16 surrogates, terminal escapes,
    control characters, then NFC. max_decode_length (segments of 1M characters) is left out.

    Mojibake repair (fix_encoding) is left out: it is a heuristic (ftfy's badness.py and
    chardata.py, about a thousand lines of character classes and sloppy codecs) that guesses how
    text was mis-decoded, and a wrong guess changes correct text. Typed and pasted prompts arrive
    as Unicode from the clipboard or the shell; mojibake in a prompt is a bug upstream of us.
    """
    out, unescape = [], True
    for line in re.split(r"(?<=\n)", text):
        unescape = unescape and "<" not in line  # ftfy keeps it off for the lines after too
        while True:
            before = line
            line = ENTITY.sub(unescape_entity, line) if unescape else line
            line = line.translate(C1).translate(LIGATURES).translate(WIDTH).translate(QUOTES)
            line = LINE_BREAK.sub("\n", line)
            line = SURROGATE.sub("\ufffd", SURROGATE_PAIR.sub(join_surrogates, line))
            line = unicodedata.normalize("NFC", ANSI.sub("", line).translate(CONTROL))
            if line == before:
                break
        out.append(line)
    return "".join(out)


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
    """OpenCLIP's basic_clean (ftfy, HTML unescape twice, strip) and lower()."""
    # whitespace_clean runs in the tokenizer's normaliser. Python's strip() and lower() are
    # OpenCLIP's: lower() turns a word-final capital sigma into "ς".
    return html.unescape(html.unescape(fix_text(text))).strip().lower()


def first_words(text: str, n: int = 8) -> str:
    """The first `n` words of `text` and "..." if there are more: a 9 KB prompt in a message
    would bury the message."""
    words = text.split()
    start = " ".join(words[:n])[:80]
    return start + (" ..." if start != " ".join(words) else "")


class Tokenizer:
    """Prompts -> LongTensor [B, max_len] of CLIP token ids: BOS, text, EOS, then pad_id."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self, max_len: int = 77, pad_id: int = 0):
        self.max_len, self.pad_id = max_len, pad_id
        self._bpe = BPETokenizer(BPE(*clip_vocab(), end_of_word_suffix="</w>"))
        # whitespace_clean: Oniguruma's \s is the `regex` module's that OpenCLIP 2.x used.
        self._bpe.normalizer = normalizers.Replace(Regex(r"\s+"), " ")
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> chars
        ])
        # BOS and EOS are never matched in text: only __call__ puts them in a row.

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
                warnings.warn(self._truncation_note(text[enc.offsets[keep][0]:],
                                                    len(enc.ids) - keep), stacklevel=2)
            ids = [self.bos_id, *enc.ids[:keep], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def _truncation_note(self, dropped: str, n_tokens: int) -> str:
        """The warning for a cut prompt: the count and the first words of what CLIP won't see."""
        return (f"prompt longer than {self.max_len} tokens; CLIP will not see its last {n_tokens} "
                f"tokens ({len(dropped.split())} words), from {first_words(dropped)!r}")

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
            raise ValueError(f"{word!r} not found in prompt {first_words(prompt)!r}{where}; the "
                             f"words of the prompt are: {', '.join(text for _, _, text in kept)}")
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
