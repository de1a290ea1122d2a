"""Shared fixtures: random tiny models and their diffusers/transformers twins.

The references are parity oracles only: tests build them from the same config and load our
random state dict into them, so any difference is a difference in the forward computation.
"""

import gzip
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sd.config import TINY, ModelConfig, TextConfig, UNetConfig, VAEConfig
from sd.tokenizer import VOCAB_FILE as TOKENIZER_VOCAB
from sd.weights import build, diffusers_config

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


def run_python(*args: str) -> subprocess.CompletedProcess:
    """This Python with `args` in the repository root, as a user runs a CLI."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)

# SD 2.1's exact structure (4 levels, 2 resnets per block, 23 text layers, channel changes at the
# same places) at toy widths: every checkpoint key name of the real model exists here, so layout
# tests use the real key inventory.
SD21_NAMES = ModelConfig(
    name="sd2.1-names",
    text=TextConfig(width=32, layers=23, heads=4, mlp_width=64),
    vae=VAEConfig(channels=(16, 32, 64, 64), groups=8),
    unet=UNetConfig(channels=(32, 48, 64, 64), heads=(2, 3, 4, 4), context_dim=32, groups=8),
)


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values (default inits leave biases and norms trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(centre + std * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="session")
def tiny():
    """Our tiny model with random weights (eval mode, fp32)."""
    torch.manual_seed(0)
    m = build(TINY)
    for i, mod in enumerate((m.text_encoder, m.vae, m.unet)):
        randomize(mod, seed=i)
        mod.eval()
    return m


@pytest.fixture(scope="module")
def pipe(tiny):
    """A pipeline over `tiny` (a test module may define its own `pipe`)."""
    from sd.pipeline import Pipeline

    return Pipeline(tiny, TINY)


def reference_unet(cfg: ModelConfig, state_dict=None):
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(**{k: v for k, v in diffusers_config(cfg, "unet").items()
                                  if not k.startswith("_")})
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    return ref.eval()


def reference_vae(cfg: ModelConfig, state_dict=None):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(**{k: v for k, v in diffusers_config(cfg, "vae").items()
                           if not k.startswith("_")})
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    return ref.eval()


def reference_text(cfg: ModelConfig, state_dict=None):
    from transformers import CLIPTextConfig, CLIPTextModel

    conf = {k: v for k, v in diffusers_config(cfg, "text_encoder").items()
            if k not in ("architectures", "model_type", "torch_dtype")}
    ref = CLIPTextModel(CLIPTextConfig(**conf))
    if state_dict is not None:
        ref.load_state_dict(state_dict)
    return ref.eval()


def shipped(name: str) -> dict:
    return json.loads((DATA / f"sd21_{name}_config.json").read_text())


def relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max|ours - ref| / max|ref|, in float64: a parity measure that means the same at any scale.

    Absolute bounds are not portable: a random tiny model's latents reach 50+, and BLAS and the
    vectorised kernels (ATEN_CPU_CAPABILITY default / avx2 / avx512) order float32 reductions
    differently, so a correct forward pass differs from the reference by a few float32 ulps of
    the largest values (~1e-7 relative per op), times whatever the computation amplifies.
    """
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.isfinite().all(), "non-finite values"
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_parity(name: str, ours: torch.Tensor, ref: torch.Tensor, bound: float) -> float:
    """Relative parity (see `relative_difference`) within `bound`; prints the figure so that
    `pytest -s | grep PARITY` collects what each kernel path gives."""
    rel = relative_difference(ours, ref)
    print(f"\nPARITY {name}: {rel:.2e} relative (bound {bound:.0e}, max|ref| "
          f"{ref.abs().max().item():.3g})")
    assert rel <= bound, f"{name}: relative difference {rel:.3e} from the reference > {bound:.0e}"
    return rel


def assert_same(a: dict, b: dict) -> None:
    """Two state dicts with the same keys, dtypes and values, bit for bit."""
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


__all__ = ["DATA", "SD21_NAMES", "randomize", "reference_unet", "reference_vae",
           "reference_text", "shipped", "replace", "relative_difference", "assert_parity",
           "assert_same"]


def openai_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def openai_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """simple_tokenizer.SimpleTokenizer.__init__'s encoder and merges, verbatim in logic."""
    merges = gzip.open(TOKENIZER_VOCAB).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
    vocab = list(openai_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return dict(zip(vocab, range(len(vocab)))), merges


@pytest.fixture(scope="session")
def vocab_files(tmp_path_factory):
    """vocab.json and merges.txt as open_clip/CLIP's vocabulary is shipped for transformers."""
    path = tmp_path_factory.mktemp("clip_vocab")
    encoder, merges = openai_vocab()
    (path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path / "vocab.json"), str(path / "merges.txt")


@pytest.fixture(scope="session")
def hf_tokenizer(vocab_files):
    """transformers' CLIPTokenizer as stabilityai/stable-diffusion-2-1's tokenizer/ configures it."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(*vocab_files, pad_token="!", model_max_length=77)


@pytest.fixture(scope="module")
def toy_diffusers():
    """The committed toy model (weights/toy) as diffusers' UNet and transformers' text encoder in
    fp32, with SD's DDIM scheduler: what the official-algorithm references run on
    (tests/test_official.py, tests/test_methods.py)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextModel  # noqa: PLC0415

    weights, kw = ROOT / "weights" / "toy", {"variant": "fp16", "torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet", **kw).eval()
    text = CLIPTextModel.from_pretrained(weights, subfolder="text_encoder", **kw).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    return unet, text, scheduler
