"""The thread policy measured: small-model commands quiet and beside a CPU load, at the new
default (one thread for the tiny and toy models, sd/cli.py) and at two threads (torch's default
on two cores, what every command ran before).

    python -m bench.threads                    # about 15 minutes on 2 cores; BENCHMARKS.md
    python -m bench.threads --load 4 --runs 1 --only sd

The load is LOAD busy-looping Python processes (a load average of LOAD). Each command runs with
a timeout (--timeout, 300 s): a run that hits it is reported as "> 300 s" rather than waited on.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from sd import cli

ROOT = Path(__file__).resolve().parent.parent


def commands(tmp: Path) -> dict[str, list[str]]:
    from PIL import Image

    photos = tmp / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 30)).save(photos / f"{i}.png")
    py = [sys.executable, "-m"]
    return {
        "sd": [*py, "sd", "a photo of a red circle on a blue striped background", "--model",
               "toy", "--steps", "30", "-q", "-o", str(tmp / "sd.png")],
        "dreambooth": [*py, "train", "dreambooth", str(photos), "--instance-prompt",
                       "a photo of sks dog", "--model", "tiny", "--steps", "20", "-q",
                       "--checkpoint-every", "0", "-o", str(tmp / "db")],
        "heatmap": [*py, "recipes", "heatmap", "--toy", "10", "--weights", "weights/toy", "-q"],
        "make swap": [*py, "toy", "swap", "--cache", str(tmp / "cache"), "-o", str(tmp / "swap")],
    }


NAMES = {"sd": "`python -m sd --model toy`, 30 steps",
         "dreambooth": "tiny DreamBooth, 20 steps",
         "heatmap": "`recipes heatmap --toy 10`",
         "make swap": "`make swap`, fresh (DreamBooth included)"}


@contextmanager
def load(n: int):
    """n processes spinning on the CPU until the block ends."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(1.0)
        yield
    finally:
        for p in spin:
            p.kill()
        for p in spin:
            p.wait()


def timed(argv: list[str], threads: int | None, timeout: float, fresh: Path | None) -> float:
    """Wall seconds of one run (inf past the timeout); `fresh` is removed first (no cache)."""
    if fresh is not None:
        subprocess.run(["rm", "-rf", str(fresh)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TORCH_THREADS")}
    extra = [] if threads is None else ["--threads", str(threads)]
    start = time.perf_counter()
    try:
        r = subprocess.run(argv + extra, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return float("inf")
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - start


def show(seconds: list[float], timeout: float) -> str:
    if any(s == float("inf") for s in seconds):
        return f"> {timeout:.0f} s"
    return " / ".join(f"{s:.1f}" for s in seconds) + " s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=int, default=4, help="busy processes beside each run (4)")
    p.add_argument("--runs", type=int, default=2, help="runs per cell (2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up (300)")
    p.add_argument("--only", nargs="+", choices=list(NAMES), default=list(NAMES))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp))
        for name in args.only:
            fresh = Path(tmp) / ("cache" if name == "make swap" else "db")
            cells = []
            for loaded in (False, True):
                for threads in (None, 2):
                    def once():
                        return timed(cmds[name], threads, args.timeout, fresh)
                    if loaded:
                        with load(args.load):
                            times = [once() for _ in range(args.runs)]
                    else:
                        times = [once() for _ in range(args.runs)]
                    cells.append(times)
                    print(f"{name}: {'load ' + str(args.load) if loaded else 'quiet'}, "
                          f"{'default' if threads is None else f'{threads} threads'}: "
                          f"{show(times, args.timeout)}", file=sys.stderr, flush=True)
            quiet, busy = statistics.median(cells[0]), statistics.median(cells[2])
            rows.append(f"| {NAMES[name]} | {show(cells[0], args.timeout)} | "
                        f"{show(cells[1], args.timeout)} | {show(cells[2], args.timeout)} | "
                        f"{show(cells[3], args.timeout)} | {busy / quiet:.2f}x |")
    print(f"| command | quiet, default (1 thread) | quiet, 2 threads | load {args.load}, "
          f"default | load {args.load}, 2 threads | default: load / quiet |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
