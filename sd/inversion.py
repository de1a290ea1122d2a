"""Invert a real photo so guided DDIM reproduces it: x_T plus one unconditional context per step.

Null-text inversion (Mokady et al. 2022, "Null-text Inversion for Editing Real Images",
arXiv:2211.09794), as google/prompt-to-prompt's null_text_w_ptp.ipynb (NullInversion) does it:
DDIM-invert the photo's latent with the source prompt at guidance 1, then walk down from x_T and
optimise each step's unconditional ("null") embedding so the guided DDIM step lands back on the
inversion trajectory. The fast mode is negative-prompt inversion (Miyake et al. 2023,
arXiv:2305.16807): the prompt's own embedding as the unconditional one, no optimisation.
The command line: python -m sd invert photo.jpg --prompt "a photo of a cat" -o cat.inv
"""

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from sd import ddim
from sd.config import MAX_INVERSION_STEPS, InversionSettings
from sd.files import atomic_write
from sd.pipeline import Pipeline

FORMAT = "sd21-inversion/1"  # safetensors metadata "format": what the file holds, and its version


@dataclass
class Inversion:
    """A photo, inverted: what guided DDIM needs to redraw it, and the settings that made it."""

    x_T: torch.Tensor  # [1, 4, h, w]
    uncond: list[torch.Tensor]  # one [1, 77, width] context per sampling step, in model dtype
    prompt: str
    steps: int
    guidance: float
    method: str  # "null-text" or "negative-prompt"
    inner_steps: int  # Adam iterations allowed per step (0 for negative-prompt)
    lr: float
    epsilon: float
    model: str  # fingerprint() of the model it was made with


def fingerprint(pipe: Pipeline) -> str:
    """Config, prediction type and a digest of every tensor of the text encoder, VAE and UNet.

    Per tensor, the values rounded to fp16 are laid out in 7 columns and each column summed in
    float64: changing any one value changes its column's sum, and moving values about almost
    surely does. The sums are exact, hence the same in any order, on any device and for the model
    in fp16 or fp32 (an inversion made on a GPU replays on a CPU): an fp16 value is a multiple of
    2^-24, and float64 holds every such multiple below 2^29 (a tensor's sum of |w| is far less).
    One pass over the weights where they are, none copied to the host."""
    h = hashlib.sha256()
    for part in ("text_encoder", "vae", "unet"):
        for name, w in getattr(pipe.models, part).state_dict().items():
            columns = sum(F.pad(c.half().double(), (0, -len(c) % 7)).view(-1, 7).sum(0)
                          for c in w.detach().flatten().split(7 * 2**21))  # bounds the copy
            h.update(f"{part}.{name}".encode() + columns.cpu().numpy().tobytes())
    return f"{pipe.cfg.name}/{pipe.cfg.schedule.prediction}/{h.hexdigest()[:16]}"


@torch.no_grad()
def ddim_inversion(pipe: Pipeline, latent: torch.Tensor, cond: torch.Tensor, steps: int,
                   progress: bool = False) -> list[torch.Tensor]:
    """[x_0 (the clean latent), x_1, ..., x_T], DDIM towards noise at guidance 1: sampling step
    i (from timesteps(steps)[i]) should land on trajectory[-2 - i]."""
    s = pipe.cfg.schedule
    xs = [latent]
    for t_next in tqdm(ddim.timesteps(steps, s).flip(0).tolist(), desc="DDIM inversion",
                       disable=not progress):
        out = pipe.models.unet(xs[-1], t_next, cond)  # at the TARGET timestep: ddim.inverse_step
        t = ddim.previous(t_next, steps, s)
        xs.append(ddim.inverse_step(out, xs[-1], t, t_next, pipe.ac, s.prediction).to(latent.dtype))
    return xs


def _host_bool(flag: torch.Tensor) -> Callable[[], bool]:
    """Start copying a 0-dim device bool to the host; the returned function waits for it alone."""
    if flag.device.type != "cuda":
        return lambda: bool(flag)
    host, ready = flag.to("cpu", non_blocking=True), torch.cuda.Event()  # pinned, queued
    ready.record()
    return lambda: ready.synchronize() or bool(host)  # waits for this point of the stream only


def _guided_step(pipe: Pipeline, x: torch.Tensor, t: int, t_prev: int, out_uncond: torch.Tensor,
                 out_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, then the DDIM step t -> t_prev, in fp32 (the loss's dtype)."""
    out = out_uncond + guidance * (out_cond - out_uncond)
    return ddim.step(out, x.float(), t, t_prev, pipe.ac, pipe.cfg.schedule.prediction)


def null_text_inversion(pipe: Pipeline, trajectory: list[torch.Tensor], cond: torch.Tensor,
                        guidance: float = 7.5, num_inner_steps: int = 10, lr: float = 1e-2,
                        epsilon: float = 1e-5, progress: bool = False) -> list[torch.Tensor]:
    """One unconditional context per step under which guided DDIM from x_T retraces `trajectory`.

    The notebook's loop and defaults: Adam at lr * (1 - i/100) on step i from the last step's
    embedding, at most num_inner_steps iterations, stop once the loss < epsilon + i * 2e-5. The
    embedding and Adam stay fp32 (the UNet sees the embedding in its dtype); the models are frozen.
    Two departures, exact in fp32 (tests/test_inversion.py compares with the notebook):
    - Host syncs. The early stop needs every iteration's loss on the host; loss.item() after the
      Adam step would drain the GPU queue each time. We compare on the device, copy the flag
      without blocking and read it once the NEXT forward is queued. That forward is never wasted:
      at the end it is the output at the final embedding that advancing x_t needs anyway.
    - Loss scale. mse's mean over N values makes output gradients ~1/N, which underflow in fp16:
      we backpropagate loss * 2^round(log2 N) and give Adam eps * the same, to which Adam is
      invariant; a power of two changes no bit in fp32.
    """
    steps, s, unet, dtype = len(trajectory) - 1, pipe.cfg.schedule, pipe.models.unet, pipe.dtype
    if steps > MAX_INVERSION_STEPS:
        raise ValueError(f"{steps} steps: the learning rate lr * (1 - i/100) is < 0 past 100")
    for m in (pipe.models.text_encoder, pipe.models.vae, unet):
        m.requires_grad_(False)
    x = trajectory[-1]
    scale = 2.0 ** round(math.log2(x.numel()))
    emb = pipe.encode_prompt("").float()  # the notebook starts from the empty prompt's context
    out: list[torch.Tensor] = []
    bar = tqdm(ddim.timesteps(steps, s).tolist(), desc="null-text inversion", disable=not progress)
    for i, t in enumerate(bar):
        t_dev = torch.full((), t, device=x.device)  # a fill kernel: no host-to-device copy
        target = trajectory[-2 - i].float()
        with torch.no_grad():
            out_cond = unet(x, t_dev, cond).float()
        guided_step = partial(_guided_step, pipe, x, t, ddim.previous(t, steps, s),
                              out_cond=out_cond, guidance=guidance)  # of the uncond output only
        emb = emb.detach().clone().requires_grad_()  # a new leaf: out[-1] must not move
        opt = torch.optim.Adam([emb], lr=lr * (1 - i / 100), eps=1e-8 * scale)
        below = None  # -> whether iteration j - 1's loss was under the threshold
        for j in range(num_inner_steps + 1):  # the extra forward is the final one, without grad
            with torch.set_grad_enabled(j < num_inner_steps):
                out_uncond = unet(x, t_dev, emb.to(dtype)).float()
            if j == num_inner_steps or (below is not None and below()):
                break
            loss = F.mse_loss(guided_step(out_uncond), target)
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            opt.step()
            below = _host_bool(loss.detach() < epsilon + i * 2e-5)
        bar.set_postfix(iterations=j)
        out.append(emb.detach().to(dtype))
        with torch.no_grad():
            x = guided_step(out_uncond.detach()).to(x.dtype)
    return out


def invert(pipe: Pipeline, latent: torch.Tensor, prompt: str,
           s: InversionSettings = InversionSettings(), progress: bool = False) -> Inversion:
    """A clean latent (Pipeline.encode) -> its inversion; `s.fast` for negative-prompt inversion."""
    cond = pipe.encode_prompt(prompt).to(pipe.dtype)
    trajectory = ddim_inversion(pipe, latent.to(pipe.device, pipe.dtype), cond, s.steps, progress)
    if s.fast:  # Miyake et al.: the conditional context stands in for the null one at every step
        uncond, method, inner_steps = [cond] * s.steps, "negative-prompt", 0
    else:
        uncond = null_text_inversion(pipe, trajectory, cond, s.guidance, s.inner_steps, s.lr,
                                     s.epsilon, progress)
        method, inner_steps = "null-text", s.inner_steps
    return Inversion(trajectory[-1], uncond, prompt, s.steps, s.guidance, method, inner_steps,
                     s.lr, s.epsilon, fingerprint(pipe))


def reconstruct(pipe: Pipeline, inv: Inversion, progress: bool = False) -> torch.Tensor:
    """Guided DDIM from the inversion's x_T with its contexts: the photo's latent, approximately."""
    return pipe(inv.prompt, steps=inv.steps, guidance=inv.guidance, latents=inv.x_T,
                uncond=inv.uncond, output="latent", progress=progress)


def save(inv: Inversion, path: str | Path) -> None:
    """One safetensors file (x_T, contexts, the rest as string metadata), written atomically."""
    path = Path(path)
    tensors = {"x_T": inv.x_T.contiguous().cpu(), "uncond": torch.cat(inv.uncond).cpu()}
    meta = {f.name: str(getattr(inv, f.name)) for f in fields(inv) if f.name not in tensors}
    with atomic_write(path) as tmp:  # an interrupted run never leaves half a file
        save_file(tensors, tmp, metadata={"format": FORMAT, **meta})


def load(path: str | Path, pipe: Pipeline, steps: int | None = None) -> Inversion:
    """Read an inversion; refuse one made with another model or (if given) step count."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot be read as an inversion ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an inversion file (no format {FORMAT!r} in its metadata)")
    kinds = {f.name: f.type for f in fields(Inversion)}  # str, int or float
    inv = Inversion(x_T=tensors["x_T"].to(pipe.device, pipe.dtype),
                    uncond=list(tensors["uncond"].to(pipe.device, pipe.dtype).split(1)),
                    **{k: kinds[k](v) for k, v in meta.items() if k in kinds})
    if inv.model != fingerprint(pipe):
        raise ValueError(f"{path} was inverted with model {inv.model}, but this model is "
                         f"{fingerprint(pipe)}: invert the photo again with this model")
    if steps is not None and steps != inv.steps:
        raise ValueError(f"{path} was inverted with {inv.steps} DDIM steps, not {steps}: sample "
                         f"with --steps {inv.steps} or invert the photo again")
    return inv
