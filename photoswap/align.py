"""Which tokens are the subject, and which source token each target token takes its map from.

The cross-attention swap (A) gives the target branch the source's cross-attention maps. Source
and target prompts differ ("a photo of a cat" -> "a photo of a sks dog"), so target token j must
be told which source column to take: prompt-to-prompt's "refinement" edit aligns the two token
sequences globally and blends, per target token, the source map (weight alpha_j = 1 where the
token is aligned) with the target's own map (alpha_j = 0 for tokens new in the target).
Source: google/prompt-to-prompt, seq_aligner.py (get_mapper, get_refinement_mapper), used
unchanged by eric-ai-lab/photoswap (utils.py).
"""

import torch

from sd.tokenizer import Tokenizer


def subject_indices(tokenizer: Tokenizer, prompt: str, words: str | list[str]) -> list[int]:
    """Token positions (BOS is 0) of every occurrence of every subject word or phrase.

    Subwords ("photorealistic" is several tokens), repeated words and multi-token concepts
    ("sks dog", "<my-cat>") are handled by whole-word matching; an absent word raises ValueError
    listing the prompt's words.
    """
    words = [words] if isinstance(words, str) else words
    found = {i for w in words for i in tokenizer.word_indices(prompt, w)}
    return sorted(found)


def token_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as the text encoder sees them, BOS and EOS included, padding excluded."""
    keep = tokenizer.max_len - 2
    return [tokenizer.bos_id, *tokenizer.encode(prompt)[:keep], tokenizer.eos_id]


def global_align(x: list[int], y: list[int]) -> list[int]:
    """For every element of y, the index in x it is aligned to, or -1 (Needleman-Wunsch).

    Scores as prompt-to-prompt's ScoreParams(gap=0, match=1, mismatch=-1): with a free gap a
    mismatch never pays, so differing tokens are left unaligned rather than paired. Ties break as
    there (gap in x first, then gap in y, then the diagonal), so the same prompts give the same
    mapping as the official code.
    """
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1: left (gap in x), 2: up, 3: diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    mapper, i, j = [-1] * m, n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == 3:
            i, j = i - 1, j - 1
            mapper[j] = i
        elif step == 1:
            j -= 1
        else:
            i -= 1
    return mapper


def refinement(tokenizer: Tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P refinement: (mapper [L] long, alphas [L] float) over all L = max_len positions.

    Target position j takes source column mapper[j] with weight alphas[j] and its own map with
    1 - alphas[j]. The prompts' tokens (BOS and EOS included) are aligned by `global_align`; a
    target token left unaligned keeps its own map (alpha 0). Padding position j takes source
    position j, as prompt-to-prompt's get_mapper does (and the Photoswap code with it): where the
    target is longer, its first padding tokens read the source's last padding tokens' places
    shifted, and where it is shorter they read the source's last words.
    """
    x, y, size = token_ids(tokenizer, source), token_ids(tokenizer, target), tokenizer.max_len
    aligned = global_align(x, y)
    alphas = [float(s >= 0) for s in aligned] + [1.0] * (size - len(y))
    mapper = [max(s, 0) for s in aligned] + list(range(len(y), size))
    return torch.tensor(mapper), torch.tensor(alphas)


def value_mixer(mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """W [L, L] with W[s, j] = alphas[j] where mapper[j] == s, so that the refined map

        A'[:, j] = alphas[j] A_src[:, mapper[j]] + (1 - alphas[j]) A_tgt[:, j]

    applied to v gives A' v = A_src (W v) + A_tgt ((1 - alphas) v): two fused attention calls
    instead of two explicit maps (the README's "The attention interface")."""
    w = torch.zeros(len(mapper), len(mapper), dtype=alphas.dtype)
    w[mapper, torch.arange(len(mapper))] = alphas  # one nonzero per column: no overlap to sum
    return w
