"""recipes.cds (DDS, Hertz et al. 2023; CDS, Nam et al. 2024) on the tiny random model."""

from dataclasses import replace

import torch
from conftest import run_python
from PIL import Image

from recipes.cds import Settings, dds_step, edit, patch_nce


def latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def contexts(pipe, source: str, target: str):
    return pipe.encode_prompt([source, target]), pipe.encode_prompt("")


def test_dds_gradient_is_zero_for_identical_prompts(pipe):
    """Same prompt, same latent, same t and noise: the two predictions cancel exactly, so DDS
    leaves the photo where it is (SDS would not); a different target prompt does not cancel."""
    z, noise, s, g = latent(0), latent(1), Settings(), torch.Generator()
    same = contexts(pipe, "a red circle", "a red circle")
    delta, _ = dds_step(pipe, z, z.clone(), *same, 500, noise, s, g)
    assert delta.abs().max() == 0
    other = contexts(pipe, "a red circle", "a blue square")
    delta, _ = dds_step(pipe, z, z.clone(), *other, 500, noise, s, g)
    assert delta.abs().max() > 1e-3
    out = edit(pipe, z, "a red circle", "a red circle", replace(s, iterations=3, w_cut=0.0))
    assert torch.equal(out, z)


def test_one_dds_iteration_is_the_official_step(pipe):
    """z_trg <- z_trg - lr * scale * w_dds * delta, with delta at the t and noise drawn first
    from the seed: the step the official codes take at 512 px, per latent element."""
    z, s = latent(0), replace(Settings(), iterations=1, w_cut=0.0, w_dds=2.0)
    out = edit(pipe, z, "a red circle", "a blue square", s, seed=7)
    g = torch.Generator().manual_seed(7)
    t = int(torch.randint(s.t_min, s.t_max, (1,), generator=g))
    noise = torch.randn(z.shape, generator=g)
    delta, _ = dds_step(pipe, z, z.clone(), *contexts(pipe, "a red circle", "a blue square"), t,
                        noise, s, g)
    torch.testing.assert_close(out, z - 0.1 * (2000 / 4096) * 2.0 * delta)


def test_the_contrastive_loss_reaches_the_target_latent(pipe):
    z = latent(0)
    z_trg = (z + 0.3 * latent(2)).requires_grad_(True)
    delta, cut = dds_step(pipe, z, z_trg, *contexts(pipe, "a red circle", "a blue square"), 500,
                          latent(1), Settings(), torch.Generator().manual_seed(0))
    assert not delta.requires_grad and torch.isfinite(cut) and cut > 0
    cut.backward()
    assert torch.isfinite(z_trg.grad).all() and z_trg.grad.abs().sum() > 0


def test_patch_nce_is_finite_and_zero_gradient_safe():
    g, s = torch.Generator().manual_seed(0), Settings()
    source = torch.randn(5 * 3, 16, generator=g)  # a 5x3 map: pooled by 2, it is 2x1
    for target in (source.clone(), torch.zeros(15, 16), torch.randn(15, 16, generator=g)):
        target.requires_grad_(True)
        loss = patch_nce(source, target, (5, 3), s, g)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(target.grad).all()
    zero = torch.zeros(15, 16, requires_grad=True)  # no direction at all: loss log(patches)
    patch_nce(torch.zeros(15, 16), zero, (5, 3), replace(s, patch_sizes=(1,)), g).backward()
    assert torch.isfinite(zero.grad).all()
    one = torch.randn(1, 16, requires_grad=True)  # a single patch: nothing to contrast
    loss = patch_nce(torch.randn(1, 16), one, (1, 1), s, g)
    loss.backward()
    assert loss == 0 and one.grad.abs().max() == 0


def test_patch_nce_rewards_the_source_structure():
    """Target features equal to the source's score lower than the same features shuffled in
    space: the loss measures where things are, not what they are."""
    g, s = torch.Generator().manual_seed(0), Settings()
    source = torch.randn(64, 32, generator=g)
    shuffled = source[torch.randperm(64, generator=g)]
    same = patch_nce(source, source, (8, 8), s, torch.Generator().manual_seed(1))
    moved = patch_nce(source, shuffled, (8, 8), s, torch.Generator().manual_seed(1))
    assert same < 0.5 * moved


def test_cli_help_is_fast_and_errors_are_one_line(tmp_path):
    r = run_python("-X", "importtime", "-m", "recipes", "cds", "--help")
    assert r.returncode == 0 and "--w-cut" in r.stdout and "0.07" in r.stdout
    assert " torch\n" not in r.stderr  # parsed before torch was imported
    r = run_python("-m", "recipes", "cds", "photo.png", "--source", "a cat")
    assert r.returncode == 2 and "--target" in r.stderr
    out = tmp_path / "edited.png"
    r = run_python("-m", "recipes", "cds", str(tmp_path / "nope.png"), "--source", "a",
                   "--target", "b", "--model", "tiny", "-o", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in r.stderr and not out.exists()  # what this test made, not the tree
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    r = run_python("-m", "recipes", "cds", str(tmp_path / "photo.png"), "--source", "a",
                   "--target", "b", "--model", "tiny", "-o", str(tmp_path / "out.xyz"))
    assert r.returncode == 2 and "extension" in r.stderr and "model:" not in r.stderr
    r = run_python("-m", "recipes", "cds", str(tmp_path / "photo.png"), "--source", "a",
                   "--target", "b", "-o", str(tmp_path))
    assert r.returncode == 2 and "folder" in r.stderr


def test_cli_end_to_end_on_tiny(tmp_path):
    photo, out = tmp_path / "photo.png", tmp_path / "out.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(photo)
    r = run_python("-m", "recipes", "cds", str(photo), "--source", "a red circle", "--target",
                   "a blue circle", "--model", "tiny", "--iterations", "2", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)


def test_toy_evaluation_and_picture(pipe, tmp_path):
    from recipes.cds import evaluate_toy

    result, shown = evaluate_toy(pipe, 1, replace(Settings(), iterations=1))
    assert set(result) == {"unedited subject", "dds background", "dds subject",
                           "cds background", "cds subject"}
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values())
    assert len(shown) == 1 and [x.shape for x in shown[0]] == [(1, 3, 64, 64)] * 4
    out = tmp_path / "toy.png"
    r = run_python("-m", "recipes", "cds", "--toy", "1", "--model", "tiny", "--iterations", "1",
                   "-q", "-o", str(out))
    assert r.returncode == 0 and "background PSNR" in r.stdout, r.stderr
    assert Image.open(out).size == (4 * 256, 256)
