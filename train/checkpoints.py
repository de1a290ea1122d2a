"""Checkpoints: out/checkpoint-N/ folders that an interrupted save never destroys, the `latest`
pointer, resuming bit for bit, pruning old ones, and the metrics log that a resume cuts back.

A checkpoint holds what the trainer writes (the trained weights) and state.pt, everything else a
bit-exact resume needs (step, optimizer, GradScaler, random states). It is written as
checkpoint-N.tmp/ and renamed when complete (atomic_folder below); `latest` is replaced
atomically after that. A save killed at any point leaves the previous checkpoint and a `latest`
that names it. save_weights writes components in the diffusers layout that sd.weights.load reads.
"""

import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sd.config import ModelConfig
from sd.files import atomic_write, fsync, umask_mode
from sd.weights import FILES, diffusers_config, read
from train import UsageError


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """sd.files.atomic_write for a folder: yield an empty NAME.tmp/ to fill; on success it
    replaces `path`, on failure it is removed."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    swapped = False
    try:  # from here Ctrl-C at any point leaves `path` as it was, or complete, and no NAME.tmp/
        shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of a killed run
        tmp.mkdir(parents=True)
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:  # safetensors creates 0600: the umask's mode, as any other file
                os.chmod(Path(folder, name), umask_mode())
            for name in [*files, "."]:
                fsync(Path(folder, name))
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():  # a folder cannot replace a non-empty one: swap, then delete
            swapped = True
            os.replace(path, old)
        os.replace(tmp, path)
        fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if swapped and not path.exists():  # stopped between the two renames: put it back
            os.replace(old, path)
        shutil.rmtree(old, ignore_errors=True)
        raise


def save(out: Path, step: int, write: Callable[[Path], None], state: dict,
         keep: int | None = None) -> Path:
    """out/checkpoint-N from `write(folder)` and `state`, then `latest`; then, with `keep`, all
    but the newest `keep` complete checkpoints are removed."""
    final = out / f"checkpoint-{step}"
    with atomic_folder(final) as tmp:
        write(tmp)
        torch.save(state, tmp / "state.pt")
    with atomic_write(out / "latest") as tmp:
        tmp.write_text(final.name + "\n")
    if keep:
        prune(out, keep)
    return final


def complete(out: Path) -> list[Path]:
    """The complete checkpoints in `out`, oldest first (NAME.tmp/ is an interrupted save)."""
    found = [f for f in out.glob("checkpoint-*")
             if re.fullmatch(r"checkpoint-\d+", f.name) and (f / "state.pt").is_file()]
    return sorted(found, key=lambda f: int(f.name.split("-")[1]))


def prune(out: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints, never the one `latest` names."""
    latest = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    for folder in complete(out)[:-keep]:
        if folder.name != latest:
            shutil.rmtree(folder)


def find(out: Path, resume: str) -> Path:
    """--resume: a checkpoint folder, or "latest" (the one out/latest names)."""
    if resume == "latest":
        pointer = out / "latest"
        if not pointer.is_file():
            raise UsageError(f"--resume latest: no checkpoint in {out} (no {pointer}); pass the "
                             "same -o as the interrupted run, or a checkpoint folder")
        folder = out / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not (folder / "state.pt").is_file():
        raise UsageError(f"--resume: {folder} is not a checkpoint (no state.pt in it)")
    return folder


def log_row(file: Path, row: dict) -> None:
    """Append a row to a CSV file (its keys are the header of a new file)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
        if f.tell() == 0:
            f.write(",".join(row) + "\n")
        f.write(",".join(f"{v:.5g}" if isinstance(v, float) else str(v) for v in row.values())
                + "\n")


def cut_log(file: Path, step: int) -> None:
    """Drop the rows after `step` (the resumed run writes them again); no rows left: no file."""
    if not file.exists():
        return
    header, *rows = file.read_text().splitlines(keepends=True)
    rows = [r for r in rows if int(r.split(",")[0]) <= step]
    if rows:
        file.write_text(header + "".join(rows))
    else:
        file.unlink()


def expect(folder: Path, files: list[str], what: str) -> None:
    """Refuse to resume from a checkpoint whose weight files are not exactly `files`."""
    found = sorted(str(f.relative_to(folder)) for f in folder.rglob("*.safetensors"))
    if found != sorted(files):
        raise UsageError(f"--resume {folder}: it holds {', '.join(found) or 'no weights'}, but "
                         f"this run trains {what}; resume with the options it was made with, "
                         "or start afresh with another -o")


def training_state(step: int, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   gen: torch.Generator, seconds: float = 0.0,
                   settings: dict | None = None) -> dict:
    """Everything besides the weights that a bit-exact resume needs, the training time so far
    and the settings a resume must share; tensors and plain types only, so it loads with
    torch.load(weights_only=True)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"step": step, "seconds": seconds, "settings": settings or {},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": {"data": gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}}


def restore(folder: Path, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            gen: torch.Generator, settings: dict | None = None) -> tuple[int, float]:
    """Load a training_state() from a checkpoint folder; returns its step and seconds. A
    UsageError for a damaged state.pt, or for `settings` that differ from the saved ones."""
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
        why = " ".join(str(e).split())[:120]
        raise UsageError(f"--resume: {folder / 'state.pt'} cannot be read ({why}): resume from "
                         f"an earlier checkpoint in {folder.parent}, or start afresh") from None
    saved = state.get("settings") or {}  # older checkpoints did not keep them
    if differ := [k for k in saved if settings and k in settings and saved[k] != settings[k]]:
        given = ", ".join(f"--{k.replace('_', '-')} {settings[k]} (it had {saved[k]})"
                          for k in differ)
        raise UsageError(f"--resume: {folder} was trained with other settings: {given}; "
                         "resume with its settings, or start afresh in another -o folder")
    opt.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when saved without fp16
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["rng"]["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state.get("seconds", 0.0)  # older ones lack seconds


def load_modules(folder: Path, **modules: nn.Module) -> None:
    """Load components saved by save_weights (full precision) back into modules, strictly."""
    for name, module in modules.items():
        sd = read(folder / f"{FILES[name]}.safetensors")
        # save_weights writes the text encoder with transformers' "text_model." prefix
        module.load_state_dict({k.removeprefix("text_model."): v for k, v in sd.items()})


def save_weights(folder: str | Path, cfg: ModelConfig, fp16: bool = False,
                 **modules: nn.Module) -> None:
    """Save components (unet=, vae=, text_encoder=) in the diffusers layout, with configs."""
    folder = Path(folder)
    for name, module in modules.items():
        sd = {k: v.detach().to("cpu", torch.float16 if fp16 else v.dtype).contiguous()
              for k, v in module.state_dict().items()}
        if name == "text_encoder":  # as transformers writes CLIPTextModel files
            sd = {"text_model." + k: v for k, v in sd.items()}
        file = folder / f"{FILES[name]}{'.fp16' if fp16 else ''}.safetensors"
        with atomic_write(file) as tmp:
            save_file(sd, tmp, metadata={"format": "pt"})
        with atomic_write(file.parent / "config.json") as tmp:
            tmp.write_text(json.dumps(diffusers_config(cfg, name), indent=2))
