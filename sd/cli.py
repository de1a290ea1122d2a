"""What every command line of the project shares: errors and exit codes, the thread policy, and
checks of the paths a command will write. Imports nothing heavy, so `--help` and usage errors
answer before torch loads.

Exit codes, one policy for every entry point (`run`):
    2    what the user gave is wrong (an argument, a file, the weights): ValueError, which
         UsageError and WeightsError below are; printed as one `error:` line;
    1    the work failed (a disk that fills, a folder that goes away, memory): OSError,
         MemoryError, out of GPU memory; one `error:` line;
    130  interrupted (Ctrl-C): one line; every file is written atomically, so nothing is left
         half-written.
Anything else is a bug and keeps its traceback.

Threads (`threads`): two OpenMP threads on two busy cores spin at every barrier and run slower
than one (BENCHMARKS.md, "Threads": 1.2x to over 4x beside four busy processes). Small models
(the tiny and toy presets: a UNet call is a few milliseconds, too little to share) run on one
thread by default; SD-size models keep torch's default, all cores. `--threads N`, else
TORCH_THREADS, else OMP_NUM_THREADS (which torch reads itself), overrides the default.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sd.config import DTYPE_NAMES, PRESETS
from sd.errors import MissingWeights, UsageError, WeightsError  # noqa: F401 (the CLI layer's)

USAGE, FAILED, INTERRUPTED = 2, 1, 130
MODEL_HELP = ("sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; sd1.5, sd1.4: 512 px, "
              "epsilon, CLIP ViT-L; toy: our 64 px model, committed in weights/toy; tiny, "
              "sd1.5-tiny: random toy-size weights (2.x, 1.x) for trying the code (default: "
              "from the weights)")


def advice(e: BaseException) -> str:
    """What a user of this repository's commands can do about an error (the Makefile's targets:
    the library does not know them), or ""."""
    if not isinstance(e, MissingWeights):
        return ""
    if e.preset == "toy":
        return (" The toy model is committed in weights/toy of this repository (git checkout "
                "weights/toy); `make toy` retrains it from scratch (about 2 CPU hours).")
    return (f"\nDownload them (2-3 GB) with:\n    make weights MODEL={e.preset}\nor: python "
            f"weights/fetch.py {e.preset}\nSee weights/README.md for the files, the mirrors and "
            "the licence. To try the code without weights, use --model tiny (random weights).")


def one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, ValueError) else " ".join(text.split())


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """main(argv)'s exit code, with the policy above for what it raises. After Ctrl-C the
    process ends here, with exit code 130, once the streams are flushed: CPython marks a
    KeyboardInterrupt that went through exec() of a string as unhandled even when it is caught
    later (mpmath does such an exec() while torch imports it lazily at an optimiser's first
    use), and its normal exit would then kill the process with SIGINT instead."""
    code = outcome(main, argv)
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def outcome(main: Callable[[list[str] | None], int | None], argv: list[str] | None) -> int:
    try:
        return main(argv) or 0
    except ValueError as e:
        print(f"error: {one_line(e)}{advice(e)}", file=sys.stderr)
        return USAGE
    except (OSError, MemoryError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("interrupted (nothing half-written is left)", file=sys.stderr)
        return INTERRUPTED
    except RuntimeError as e:
        if "out of memory" not in str(e):
            raise
        print(f"error: out of memory: {one_line(e)[:200]}", file=sys.stderr)
        return FAILED


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser whose usage errors are one `error:` line (exit code 2), like every other
    error of a command, not a line after a usage block."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(USAGE, f"error: {message} (see {prog} --help)\n")
    return p


def add_model_options(p: argparse.ArgumentParser, dtype_default: str | None = None,
                      weights_help: str = "diffusers folder or single-file checkpoint") -> None:
    """--model, --weights, --device, --dtype, -q and --threads: how every command that runs a
    model names it and where it runs (open_pipeline below applies them)."""
    p.add_argument("--model", choices=["auto", *PRESETS], default="auto", help=MODEL_HELP)
    p.add_argument("--weights", type=Path, help=f"{weights_help} (default: weights/sd2.1-base, "
                   "or weights/MODEL with --model)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=dtype_default,
                   help=f"of the model (default: {dtype_default})" if dtype_default else
                   "of the model (default: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_threads(p)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive, metavar="N", help="CPU threads for torch (default: "
                   "1 for the tiny and toy models, all cores for SD; TORCH_THREADS and "
                   "OMP_NUM_THREADS are honoured)")


def positive(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of 1 or more, not {text!r}")
    return n


def small(cfg) -> bool:
    """Whether a model's calls are too small to share between threads (tiny, toy)."""
    return max(cfg.unet.channels) <= 128


def threads(requested: int | None = None, cfg=None) -> int:
    """Apply the thread policy (module docstring) for a model config; returns the count used."""
    import torch

    env = os.environ.get("TORCH_THREADS")
    if requested is None and env:
        requested = positive(env)
    if requested is None and "OMP_NUM_THREADS" not in os.environ and cfg is not None:
        requested = 1 if small(cfg) else None
    if requested is not None and requested != torch.get_num_threads():
        torch.set_num_threads(requested)
    return torch.get_num_threads()


def writable(path: Path, flag: str = "-o", folder: bool = False) -> Path:
    """`path` if it can be written (as a file, or a folder); a UsageError saying why not."""
    from sd.files import unwritable

    if problem := unwritable(path, folder=folder):
        raise UsageError(f"{flag}: {problem}")
    return path


def size_warning(height: int | None, width: int | None, cfg, batch: int = 1) -> str | None:
    """A line to print before a run much larger than the model was made for (None otherwise):
    convolutions grow with the pixels, self-attention with their square."""
    pixels = (height or cfg.resolution) * (width or cfg.resolution) * batch
    ratio = pixels / cfg.resolution**2
    if ratio <= 4:
        return None
    return (f"{height or cfg.resolution}x{width or cfg.resolution} (x{batch}) is {ratio:.0f}x the "
            f"pixels of {cfg.name}'s {cfg.resolution}x{cfg.resolution}: expect {ratio:.0f}x "
            f"(convolutions) to {ratio**2:.0f}x (self-attention) the time and memory of a step")


def open_pipeline(cfg, weights, why: str, device: str | None = None, dtype: str | None = None,
                  requested_threads: int | None = None, height: int | None = None,
                  width: int | None = None, batch: int = 1, seed: int | None = None):
    """The pipeline a command runs on: device (a ValueError for one this machine lacks), dtype
    (fp16 on CUDA, fp32 on the CPU unless given), the thread policy, the one `model:` line,
    a warning for a size far beyond the model's; `seed` seeds random (tiny) weights."""
    import torch

    from sd.pipeline import DTYPES, Pipeline, default_device_dtype, pick_device

    device = pick_device(device)
    fallback = default_device_dtype()[1] if device.type == "cuda" else torch.float32
    dtype = DTYPES[dtype] if dtype else fallback
    n = threads(requested_threads, cfg)
    print(f"model: {cfg.name} ({cfg.schedule.prediction}, {cfg.resolution} px; {why}) on "
          f"{device} in {str(dtype).removeprefix('torch.')}" +
          (f", {n} thread{'s' * (n > 1)}" if device.type == "cpu" else ""), file=sys.stderr)
    if warning := size_warning(height, width, cfg, batch):
        print(f"warning: {warning}", file=sys.stderr)
    if seed is not None:
        torch.manual_seed(seed)
    return Pipeline.load(cfg, weights, device, dtype)
