"""The attention kernel and the control interface (sd/attention.py)."""

import torch
from conftest import assert_parity

from sd.attention import Control, apply_map, attention, attention_map
from sd.config import TINY
from sd.controls import StoreMaps


def qkv(nq=12, nk=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, nq, 8, generator=g), torch.randn(2, 3, nk, 8, generator=g),
            torch.randn(2, 3, nk, 8, generator=g))


def test_fused_equals_explicit():
    # Two fp32 reductions in different orders: 1e-7 relative observed on every kernel path.
    q, k, v = qkv()
    assert_parity("fused vs explicit", attention(q, k, v), apply_map(attention_map(q, k), v), 1e-6)
    q, k, v = qkv(nq=9, nk=9)
    assert_parity("fused vs explicit, causal", attention(q, k, v, causal=True),
                  apply_map(attention_map(q, k, True), v), 1e-6)


def test_explicit_map_is_fp32_and_differentiable():
    q, k, _ = qkv()
    q = q.half().requires_grad_()
    attn = attention_map(q, k.half())
    assert attn.dtype == torch.float32
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    attn[..., 0].sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def inputs(seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, side, side, generator=g), torch.tensor(500),
            torch.randn(2, 77, TINY.unet.context_dim, generator=g))


@torch.no_grad()
def test_noop_control_equals_no_control(tiny):
    x, t, ctx = inputs()
    torch.testing.assert_close(tiny.unet(x, t, ctx, ctrl=Control()), tiny.unet(x, t, ctx),
                               rtol=0, atol=0)


@torch.no_grad()
def test_store_maps_shapes_and_sums(tiny):
    x, t, ctx = inputs(side=8)
    store = StoreMaps(keep=lambda site: True, head_mean=False)
    store.step = 3
    out = tiny.unet(x, t, ctx, ctrl=store)
    assert_parity("UNet with StoreMaps vs without", out, tiny.unet(x, t, ctx), 1e-5)  # unchanged
    assert set(store.maps) == {3}
    assert set(store.maps[3]) == {s.name for s in tiny.unet.sites}
    for site in tiny.unet.sites:
        m = store.maps[3][site.name]
        n = (8 >> site.level) ** 2
        heads = TINY.unet.heads[site.level]
        assert m.shape == (2, heads, n, n if site.kind == "self" else 77), site
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_sites_are_state_dict_prefixes(tiny):
    keys = set(tiny.unet.state_dict())
    sites = tiny.unet.sites
    assert len(sites) == 2 * len({s.name.rsplit(".", 1)[0] for s in sites})  # attn1 + attn2 each
    for site in sites:
        assert f"{site.name}.to_q.weight" in keys, site
        assert site.kind == ("self" if site.name.endswith("attn1") else "cross")
        assert site.name.startswith({"down": "down_blocks", "mid": "mid_block",
                                     "up": "up_blocks"}[site.place])
    levels = {(s.place, s.level) for s in sites}
    assert levels == {("down", 0), ("down", 1), ("mid", 2), ("up", 1), ("up", 0)}


class Uniform(Control):
    """Replaces every cross-attention map by a uniform one."""

    def __call__(self, q, k, v, site):
        if site.kind != "cross":
            return attention(q, k, v)
        attn = torch.full((*q.shape[:-1], k.shape[-2]), 1.0 / k.shape[-2])
        return apply_map(attn, v)


@torch.no_grad()
def test_replacing_maps_changes_output(tiny):
    x, t, ctx = inputs()
    base = tiny.unet(x, t, ctx)
    edited = tiny.unet(x, t, ctx, ctrl=Uniform())
    assert (edited - base).abs().max() > 1e-3
    # A uniform cross map makes the output independent of the token order.
    perm = ctx[:, torch.randperm(77)]
    assert_parity("uniform cross maps, tokens permuted", tiny.unet(x, t, perm, ctrl=Uniform()),
                  edited, 1e-5)
