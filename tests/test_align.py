"""Subject token positions and prompt-to-prompt's refinement alignment, checked by hand."""

import pytest
import torch

from photoswap.align import global_align, refinement, subject_indices, token_ids, value_mixer
from sd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_subject_indices(tok):
    assert subject_indices(tok, "a photo of a cat", "cat") == [5]
    # "photorealistic" is two BPE tokens; both belong to the word.
    assert subject_indices(tok, "a photorealistic cat", "photorealistic") == [2, 3]
    # Repeated words: every occurrence; "cat" is not found inside "cats".
    assert subject_indices(tok, "a cat and cats and a cat", "cat") == [2, 7]
    # A multi-token concept and several subjects at once.
    assert subject_indices(tok, "a photo of a sks dog", "sks dog") == [5, 6]
    assert subject_indices(tok, "a cat next to a dog", ["cat", "dog"]) == [2, 6]
    with pytest.raises(ValueError, match="the words of the prompt are: a, photo, of, a, cat"):
        subject_indices(tok, "a photo of a cat", "dog")


def test_global_align_by_hand():
    assert global_align([1, 2, 3], [1, 2, 3]) == [0, 1, 2]
    assert global_align([1, 2, 3], [1, 4, 3]) == [0, -1, 2]  # a free gap beats a mismatch
    assert global_align([1, 2, 3], [1, 7, 8, 3]) == [0, -1, -1, 2]  # longer target
    assert global_align([1, 2, 9, 3], [1, 3]) == [0, 3]  # longer source
    assert global_align([5, 5], [5]) == [0]  # ties: skipping a source token beats the diagonal


def test_refinement_cat_to_sks_dog(tok):
    mapper, alphas = refinement(tok, "a photo of a cat", "a photo of a sks dog")
    # Source ids: BOS a photo of a cat EOS (7); target: BOS a photo of a sks dog EOS (8).
    assert mapper[:8].tolist() == [0, 1, 2, 3, 4, 0, 0, 6]
    assert alphas[:8].tolist() == [1, 1, 1, 1, 1, 0, 0, 1]
    # Padding position j takes source position j (prompt-to-prompt's get_mapper): 8 onto 8,
    # the source's second padding token, ..., 76 onto 76.
    assert mapper[8:].tolist() == list(range(8, 77))
    assert alphas[8:].eq(1).all() and mapper.shape == alphas.shape == (77,)


def test_refinement_identical_prompts_is_the_identity(tok):
    mapper, alphas = refinement(tok, "a red circle", "a red circle")
    assert mapper.tolist() == list(range(77)) and alphas.eq(1).all()


def test_refinement_shorter_target_pads_onto_the_source_words_at_its_positions(tok):
    src = "a photo of a tabby cat sitting on a tabby mat"
    mapper, alphas = refinement(tok, src, "a photo of a dog")
    n_src, n_tgt = len(token_ids(tok, src)), len(token_ids(tok, "a photo of a dog"))
    assert mapper[n_tgt - 1] == n_src - 1  # EOS onto EOS
    assert mapper[n_tgt:].tolist() == list(range(n_tgt, 77))  # the first pads onto source words
    assert n_tgt < n_src and alphas[n_tgt:].eq(1).all()
    assert alphas[n_tgt - 2] == 0  # "dog" is new


def test_value_mixer_turns_the_refined_map_into_two_products():
    g = torch.Generator().manual_seed(0)
    mapper = torch.tensor([0, 1, 1, 4, 2, 3])
    alphas = torch.tensor([1.0, 0.3, 1.0, 0.0, 1.0, 0.5])
    a_src = torch.rand(2, 5, 6, generator=g).softmax(-1)
    a_tgt = torch.rand(2, 5, 6, generator=g).softmax(-1)
    v = torch.randn(2, 6, 3, generator=g)
    refined = a_src[..., mapper] * alphas + a_tgt * (1 - alphas)
    two = a_src @ (value_mixer(mapper, alphas) @ v) + a_tgt @ ((1 - alphas)[:, None] * v)
    torch.testing.assert_close(refined @ v, two)
