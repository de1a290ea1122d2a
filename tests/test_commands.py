"""The shape of the code: every command answers --help before torch loads (one mechanism: a
command's module imports only torch-free modules at its top), packages import in one direction,
no import circles, and no library module reaches into the command-line layer."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("sd", "train", "photoswap", "toy", "recipes", "bench")  # each imports only earlier ones
# Every command: `python -m` and its words (test_every_command_is_listed keeps this complete).
COMMANDS = [
    ("sd",), ("sd", "invert"), ("photoswap",),
    ("train",), ("train", "dreambooth"), ("train", "textual-inversion"),
    ("toy",), ("toy", "pretrain"), ("toy", "swap"), ("toy", "evaluate"), ("toy", "identity"),
    ("toy", "judge"),
    ("recipes",), ("recipes", "heatmap"), ("recipes", "correspondence"), ("recipes", "cds"),
    ("weights.fetch",),
    *[(f"bench.{p.stem}",) for p in sorted((ROOT / "bench").glob("*.py"))
      if "__main__" in p.read_text()],
]


def sources() -> dict[str, Path]:
    """Module name -> file, for every module of the packages and weights/fetch.py."""
    out = {"weights.fetch": ROOT / "weights" / "fetch.py"}
    for package in PACKAGES:
        for f in sorted((ROOT / package).glob("*.py")):
            out[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return out


def cli_layer(module: str) -> bool:
    """The command-line layer: sd/cli.py, each package's __main__, photoswap's run of its
    command, the benchmark scripts and weights/fetch.py."""
    return (module in ("sd.cli", "photoswap.cli", "weights.fetch") or module.endswith("__main__")
            or module.startswith("bench."))


def imports(file: Path) -> list[tuple[str, bool]]:
    """(module imported, at the top level?) for every import of a file, in functions too."""
    tree = ast.parse(file.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.module, id(node) in top))
            out += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
    return out


def test_every_command_is_listed():
    """Each module that runs as a command, and each word of a package's commands, is above."""
    listed = {c[0] for c in COMMANDS}
    for module, file in sources().items():
        if 'if __name__ == "__main__"' in file.read_text():
            assert module.removesuffix(".__main__") in listed, f"{module} is not in COMMANDS"
    for package in ("train", "toy", "recipes"):
        code = (ROOT / package / "__main__.py").read_text()
        words = {c[1] for c in COMMANDS if c[0] == package and len(c) > 1}
        assert words and all(f'"{w}"' in code for w in words), package


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_answers_before_torch_loads(command):
    """--help is instant: torch (over a second to import) is not imported for it."""
    module, *words = command
    code = ("import runpy, sys\n"
            f"sys.argv = ['x', *{words!r}, '--help']\ntry:\n"
            f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('torch imported:', 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("torch imported: False"), r.stdout[-300:]
    assert "usage" in r.stdout.lower() or "python -m" in r.stdout
    if command == ("sd",):
        assert "(default: out/image.png)" in r.stdout
    if command == ("train", "textual-inversion"):  # how to use what it learns
        assert "--concepts" in r.stdout


def test_packages_import_in_one_direction_and_the_library_not_the_cli():
    """A module imports only its own package and earlier ones (PACKAGES); outside the CLI layer
    nothing imports argparse or a module of that layer."""
    rank = {p: i for i, p in enumerate(PACKAGES)}
    mods = sources()
    wrong = []
    for module, file in mods.items():
        if module == "weights.fetch":
            continue
        own = rank[module.split(".")[0]]
        for name, _ in imports(file):
            package = name.split(".")[0]
            if package in rank and rank[package] > own:
                wrong.append(f"{module} imports {name} (a later package)")
            if not cli_layer(module) and (package == "argparse" or
                                          (name in mods and cli_layer(name))):
                wrong.append(f"{module} (library) imports {name} (command-line layer)")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    """The module graph (imports at any level, in functions too) has no cycle."""
    mods = sources()
    graph = {m: {n for n, _ in imports(f) if n in mods and n != m} for m, f in mods.items()}
    for m in mods:  # `import pkg.mod` also runs pkg/__init__.py: not an edge of its own here
        graph[m] -= {p for p in PACKAGES if p != m}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "circle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [])


def test_bench_toy_refuses_a_negative_count_before_loading_anything(capsys):
    """0 skips a part (--samples 0: no adherence); a negative count is a one-line error."""
    from bench import toy  # noqa: PLC0415

    with pytest.raises(SystemExit) as e:
        toy.main(["--samples", "-1"])
    assert e.value.code == 2 and "--samples: give 0 or more" in capsys.readouterr().err
