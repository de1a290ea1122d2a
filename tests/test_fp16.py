"""fp16 numerics: the fp32 score path that SD 2.1 (768-v, `upcast_attention`) needs, on CPU.

CPU PyTorch runs fp16 matmuls, convolutions and SDPA, so these run everywhere; on a CUDA machine
the UNet test also runs there.
"""

import copy
import math
from dataclasses import replace

import pytest
import torch
from conftest import assert_parity, reference_unet

from sd.attention import Site, apply_map, attention, attention_map
from sd.config import TINY
from sd.controls import StoreMaps

# fp16's unit roundoff is 2^-11 = 4.9e-4. Observed against the fp32 computation: 5.5e-4 for one
# attention (v rounded to fp16), 1.5e-3 to 2.4e-3 for the tiny UNet (ours, with and without the
# explicit path, and diffusers' upcast path), on the default, AVX2 and AVX-512 kernels. 1e-2
# leaves room for other CPUs and for CUDA; an overflow gives inf/NaN, a wrong path errors of 1.
FP16_TOL = 1e-2
TINY_SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", "down", 0)


def overflowing_qkv(d: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k exactly representable in fp16 whose q k^T exceeds fp16's 65504 but whose softmax is
    tame: a shared first coordinate adds 256^2 = 65536 to every score of a row (softmax ignores a
    per-row constant), the other coordinates (small integers) make the scores differ by ~10."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (2, 2, 16, d), generator=g).float()
    k = torch.randint(-3, 4, (2, 2, 9, d), generator=g).float()
    q[..., 0] = k[..., 0] = 256.0
    return q, k, torch.randn(2, 2, 9, d, generator=g)


def test_scores_that_overflow_fp16_stay_finite_and_right():
    q, k, v = overflowing_qkv()
    q16, k16, v16 = q.half(), k.half(), v.half()
    naive = (q16 @ k16.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    assert naive.isinf().any() and naive.softmax(-1).isnan().any()  # what the fp32 path avoids
    # The fp32 reference, in float64 from the same (exact) values.
    ref_map = ((q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
    ref = ref_map @ v.double()
    attn = attention_map(q16, k16)
    assert attn.dtype == torch.float32
    assert_parity("fp16 explicit map, overflowing scores", attn, ref_map, 1e-5)  # exact inputs
    assert_parity("fp16 explicit output", apply_map(attn, v16), ref, FP16_TOL)
    assert_parity("fp16 fused output", attention(q16, k16, v16), ref, FP16_TOL)
    store = StoreMaps(keep=lambda site: True, head_mean=False)
    out = store(q16, k16, v16, TINY_SITE)
    assert out.dtype == torch.float16
    assert_parity("fp16 StoreMaps output", out, ref, FP16_TOL)
    assert_parity("fp16 StoreMaps map", store.maps[0][TINY_SITE.name], ref_map, 1e-5)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@torch.no_grad()
def test_fp16_unet_against_fp32(tiny, device):
    """The tiny UNet in fp16 (GroupNorm in fp32, explicit maps in fp32) against itself in fp32,
    and diffusers' UNet in fp16 with upcast_attention=True on its explicit (non-SDPA) processor,
    the code path that flag switches, against the same fp32 output."""
    from diffusers.models.attention_processor import AttnProcessor

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 10, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    ref = tiny.unet(x, 500, ctx)
    half = copy.deepcopy(tiny.unet).to(device, torch.float16)
    x16, ctx16 = x.to(device, torch.float16), ctx.to(device, torch.float16)
    for name, ctrl in (("fused", None), ("explicit", StoreMaps(keep=lambda site: True))):
        out = half(x16, 500, ctx16, ctrl)
        assert out.dtype == torch.float16
        assert_parity(f"fp16 UNet {name} ({device})", out, ref, FP16_TOL)
    cfg = replace(TINY, unet=replace(TINY.unet, upcast_attention=True))
    theirs = reference_unet(cfg, tiny.unet.state_dict()).to(device, torch.float16)
    theirs.set_attn_processor(AttnProcessor())
    assert_parity(f"fp16 diffusers UNet, upcast_attention ({device})",
                  theirs(x16, 500, ctx16).sample, ref, FP16_TOL)
