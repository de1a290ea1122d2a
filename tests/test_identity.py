"""The identity measure (toy/identity.py): crops, scores, the training pairs; and its validation
on the committed encoder (a concept's held-out views above lookalikes)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from toy import concepts, identity, scenes

ENCODER = Path("weights/toy/identity.safetensors")


def test_crop_is_the_square_around_the_region():
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:30, 10:40] = 255  # a 10 x 30 white bar
    region = image[..., 0] > 0
    x = identity.crop(image, region, margin=1.0)
    assert x.shape == (3, identity.CROP, identity.CROP)
    # the bar spans the crop's width and a third of its height, centred
    rows = (x[0] > 0).any(1).nonzero().flatten()
    assert (x[0] > 0)[identity.CROP // 2].sum() >= identity.CROP - 4 and 8 <= len(rows) <= 14
    corner = np.zeros((64, 64), bool)
    corner[:5, :5] = True  # beyond the frame: edges replicated, not zeros
    assert identity.crop(image, corner).shape == (3, identity.CROP, identity.CROP)
    whole = identity.crop(image, np.zeros((64, 64), bool))
    assert whole.shape == (3, identity.CROP, identity.CROP) and whole.max() > 0


def test_a_view_scores_one_against_itself_and_siblings_differ_only_in_layout():
    torch.manual_seed(0)
    encoder = identity.Encoder()
    image, mask = concepts.references("dotted-star", 1)[0]
    ref = identity.reference(encoder, [(image, mask)])
    assert identity.score(encoder, image, mask, ref) == pytest.approx(1.0, abs=1e-5)
    for k in range(50):
        a, b = identity.objects(k)
        assert (a.shape, a.colour, a.texture, a.second) == (b.shape, b.colour, b.texture, b.second)
        assert a != b, "a sibling must differ from its object"


@pytest.mark.skipif(not ENCODER.is_file(), reason=f"no {ENCODER} (make toy trains it)")
def test_identity_ranks_held_out_views_above_lookalikes():
    # The acceptance: held-out views above lookalikes in at least 90% of pairs (the committed
    # encoder: 96.4%; per concept 90-100%, weights/toy/README.md). A concept's 400 pairs hold
    # near-ties that another CPU's rounding may flip, hence the per-concept margin.
    report = identity.validate(identity.load(ENCODER))
    assert report["ranked"] >= 0.9, report
    for name in concepts.CONCEPTS:
        assert report[name]["ranked"] >= 0.85, (name, report[name])
        assert report[name]["own"] > report[name]["lookalike"], (name, report[name])


def test_lookalikes_are_the_concepts_kind_in_another_layout():
    for name, (_, subject) in concepts.CONCEPTS.items():
        look = concepts.lookalike(name, 0)
        assert (look.shape, look.colour, look.second, look.texture) == (
            subject.shape, subject.colour, subject.second, subject.texture)
        assert look != subject and scenes.noun(look) == scenes.noun(subject)
