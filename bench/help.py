"""How fast every command answers --help (the list tests/test_commands.py keeps complete): each
run in a fresh process, best and worst of --runs.

    python -m bench.help
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

from sd import cli

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.help", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=cli.positive, default=3, help="runs per command (3)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_commands import COMMANDS  # noqa: PLC0415 (the one list of commands)

    print(f"{'command':30s} {'best':>7s} {'worst':>7s}")
    worst = 0.0
    for command in COMMANDS:
        seconds = []
        for _ in range(args.runs):
            start = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", *command[:1], *command[1:], "--help"],
                               cwd=ROOT, capture_output=True)
            seconds.append(time.perf_counter() - start)
            if r.returncode:
                raise cli.UsageError(f"{' '.join(command)} --help failed: {r.stderr[-200:]!r}")
        worst = max(worst, min(seconds))
        print(f"{' '.join(command):30s} {min(seconds):6.3f}s {max(seconds):6.3f}s", flush=True)
    print(f"slowest command (its best run): {worst:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
