"""A small resumable training loop for the toy pretraining, until train/loop.py lands on main.

`run` is called with what differs between stages (the loss of a step, the modules that learn,
the evaluation) and owns what they share: AdamW with warm-up and cosine decay, an EMA copy of the
weights, atomic checkpoints every `every` steps (model, optimiser, EMA, the data generator and the
step: a resumed run continues the same random stream), a tqdm bar and a CSV loss log.
"""

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Schedule:
    steps: int
    lr: float
    warmup: int = 200
    final: float = 0.02  # the cosine decays to final * lr
    weight_decay: float = 0.0
    ema: float | None = None  # EMA decay (None: no EMA)
    every: int = 250  # checkpoint and evaluate every this many steps

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * p)))


def _save(file: Path, state: dict) -> None:
    tmp = file.with_name(file.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(file)  # atomic: a crash leaves the previous checkpoint intact


def run(folder: Path, model: nn.Module, loss_fn: Callable, sched: Schedule, seed: int,
        evaluate: Callable[[nn.Module, int], dict] | None = None, progress: bool = True):
    """Train `model` (an nn.Module holding every part that learns) with `loss_fn(model, g)`.

    Returns the EMA model if any, else the model. Resumes from folder/checkpoint.pt if present.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, log = folder / "checkpoint.pt", folder / "log.csv"
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sched.lr, weight_decay=sched.weight_decay)
    ema = copy.deepcopy(model).requires_grad_(False) if sched.ema else None
    g = torch.Generator().manual_seed(seed)
    step, seconds = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        g.set_state(state["generator"])
        torch.set_rng_state(state["torch"])
        step, seconds = state["step"], state["seconds"]
    elif log.exists():
        log.unlink()
    bar = tqdm(total=sched.steps, initial=step, desc=folder.name, disable=not progress)
    t0 = time.time() - seconds
    while step < sched.steps:
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        loss, logs = loss_fn(model, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            d = min(sched.ema, (1 + step) / (10 + step))  # warm-up of the decay, as LDM's EMA
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - d)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % sched.every == 0 or step == sched.steps:
            row = {"step": step, "seconds": round(time.time() - t0), "loss": loss.item(), **logs}
            if evaluate is not None:
                row.update(evaluate(ema if ema is not None else model, step))
            with log.open("a") as f:
                if f.tell() == 0:
                    f.write(",".join(row) + "\n")
                f.write(",".join(f"{v:.5g}" if isinstance(v, float) else str(v)
                                 for v in row.values()) + "\n")
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))
            _save(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                         "ema": None if ema is None else ema.state_dict(),
                         "generator": g.get_state(), "torch": torch.get_rng_state(),
                         "step": step, "seconds": time.time() - t0})
    bar.close()
    return ema if ema is not None else model
