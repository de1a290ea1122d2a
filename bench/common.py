"""Shared helpers for the benchmarks: reference twins with our weights, timing, reporting.

The reference builders mirror tests/conftest.py (reference_unet / reference_vae / reference_text)
but are copied here so that benchmarks never import from tests/. References are built on the meta
device (no random init of a billion parameters) and then take a copy of OUR state dict, so both
sides compute with identical weights.

Torch-free at import (torch, diffusers and transformers load inside the functions that use
them), so that a benchmark's --help answers at once.
"""

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from sd.config import PRESETS, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
ALIASES = {"sd21-base": "sd2.1-base", "sd21": "sd2.1", "base": "sd2.1-base", "768": "sd2.1"}


def config(name: str) -> ModelConfig:
    """A preset of sd.config by name ("tiny", "sd2.1-base", "sd2.1"; "sd21-base" etc. accepted)."""
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise SystemExit(f"unknown config {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------- reference twins

def _load(ref, state_dict: dict | None, device, dtype):
    """Give a meta-built reference (a torch.nn.Module) our weights (copied), then move it to
    device/dtype (None: fp32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if state_dict is not None:
        sd = {k: v.detach().clone() for k, v in state_dict.items()}
        ref.load_state_dict(sd, assign=True)
    else:
        ref.to_empty(device="cpu")
    left = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer the state dict cannot carry
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    device = torch.device(device)
    if any(t.device.type != device.type or (t.is_floating_point() and t.dtype != dtype)
           for t in [*ref.parameters(), *ref.buffers()]):  # diffusers warns on a needless .to
        ref = ref.to(device, dtype)
    return ref.eval().requires_grad_(False)


def reference_unet(cfg: ModelConfig, state_dict=None, device="cpu", dtype=None):
    """diffusers' UNet2DConditionModel at our config, with our weights (dtype None: fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sd.weights import diffusers_config

    conf = {k: v for k, v in diffusers_config(cfg, "unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**conf)
    return _load(ref, state_dict, device, dtype)


def reference_vae(cfg: ModelConfig, state_dict=None, device="cpu", dtype=None):
    """diffusers' AutoencoderKL at our config, with our weights (dtype None: fp32)."""
    import torch
    from diffusers import AutoencoderKL

    from sd.weights import diffusers_config

    conf = {k: v for k, v in diffusers_config(cfg, "vae").items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = AutoencoderKL(**conf)
    return _load(ref, state_dict, device, dtype)


def reference_text(cfg: ModelConfig, state_dict=None, device="cpu", dtype=None):
    """transformers' CLIPTextModel at our config, with our weights (dtype None: fp32)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd.weights import diffusers_config

    conf = {k: v for k, v in diffusers_config(cfg, "text_encoder").items()
            if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(**conf))
    # position_ids is a non-persistent buffer, so not in any state dict: recreate it.
    emb = getattr(ref, "text_model", ref).embeddings  # transformers 4 had text_model
    if getattr(emb, "position_ids", None) is not None and emb.position_ids.is_meta:
        emb.register_buffer("position_ids",
                            torch.arange(cfg.text.max_len, device=device).expand((1, -1)),
                            persistent=False)
    return _load(ref, state_dict, device, dtype)


# --------------------------------------------------------------------------- diffusers tokenizer

def clip_tokenizer(folder: str | Path, max_len: int = 77):
    """transformers' CLIPTokenizer over sd/data/bpe_simple_vocab_16e6.txt.gz, as SD 2.x ships it.

    vocab.json: the 256 byte characters, the same with "</w>", one token per merge (lines
    1..48894 of the file after its header, joined), then <|startoftext|>, <|endoftext|>;
    merges.txt: "#version: 0.2" and the merge lines. pad_token "!" (id 0) as SD 2.x.
    """
    import gzip
    import json

    from transformers import CLIPTokenizer

    from sd.tokenizer import VOCAB_FILE, bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(VOCAB_FILE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                         pad_token="!", model_max_length=max_len)


# --------------------------------------------------------------------------- timing

class Load:
    """How much of the machine OTHER processes used between two snapshots (Linux /proc).

    The benchmark machine may be shared (another session running the test suite, the
    hypervisor stealing time): a timing sample taken while others used a noticeable share of the
    cores is slower for reasons that have nothing to do with the code under test.
    """

    def __init__(self):
        self.ok = Path("/proc/stat").exists() and Path("/proc/self/stat").exists()
        self.ncpu = os.cpu_count() or 1

    def snap(self):
        if not self.ok:
            return None
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, idle, iowait, irq, softirq, steal = f
        busy = user + nice + system + irq + softirq + steal
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        mine = int(own[11]) + int(own[12])  # utime + stime of all our threads, in ticks
        return busy, busy + idle + iowait, mine

    def others(self, s0, s1) -> float:
        """Fraction of all cores busy with other work (incl. steal) between s0 and s1."""
        if s0 is None or s1 is None:
            return 0.0
        busy, total, mine = (b - a for a, b in zip(s0, s1))
        return max(0.0, busy - mine) / max(total, 1)


LOAD = Load()


# On a machine that stays busy, waiting before every pair for quiet never ends well (20 pairs
# x 30 s); all the waits of one run share this budget, and once it is spent the run goes on
# without waiting, its disturbed pairs flagged in the report as before.
WAIT_BUDGET = [60.0]  # seconds left, for the whole run


def wait_quiet(threshold: float, max_wait: float, log=None) -> float:
    """Sleep (0.5 s probes) until others use < threshold of the machine, or max_wait passes, or
    the run's WAIT_BUDGET is spent."""
    waited, limit = 0.0, min(max_wait, WAIT_BUDGET[0])
    while waited < limit:
        s0 = LOAD.snap()
        time.sleep(0.5)
        waited += 0.5
        if LOAD.others(s0, LOAD.snap()) < threshold:
            break
    WAIT_BUDGET[0] -= waited
    if log and waited > 0.5:
        log(f"    waited {waited:.1f} s for the machine to be quiet")
    if log and limit > 0 and WAIT_BUDGET[0] <= 0:
        log("    the machine stays busy: no more waiting; disturbed pairs are flagged")
    return waited


@dataclass
class Pairwise:
    """Times of ours (a) and theirs (b) in seconds per call, one entry per pair, plus the share
    of the machine other processes used during each pair (the larger of its two samples)."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    threshold: float = 0.1

    @property
    def clean(self) -> list[int]:
        return [i for i, o in enumerate(self.others) if o < self.threshold]

    def summary(self) -> dict:
        """Medians over the undisturbed pairs (over all pairs if fewer than 3 are undisturbed)."""
        keep = self.clean if len(self.clean) >= min(3, len(self.a)) else range(len(self.a))
        a, b = [self.a[i] for i in keep], [self.b[i] for i in keep]
        r = [x / y for x, y in zip(a, b)]
        return {"ours": statistics.median(a), "theirs": statistics.median(b),
                "ratio": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r),
                "pairs": len(r), "total_pairs": len(self.a), "all_clean": len(keep) == len(
                    self.clean), "others": statistics.median(self.others)}


# "wall": elapsed time. "cpu": CPU time of this process, all threads (time.process_time): on a
# shared machine it does not count the time our threads wait while descheduled, so it stays
# close to the quiet-machine wall time when other processes compete for the cores (it does
# count OpenMP threads spinning at barriers, the same way for both sides).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_call(fn, inner: int = 1, sync=None, clock: str = "wall") -> tuple[float, float]:
    """(seconds per call of fn() averaged over `inner` back-to-back calls, others' load)."""
    now = CLOCKS[clock]
    if sync:
        sync()
    s0 = LOAD.snap()
    t0 = now()
    for _ in range(inner):
        fn()
    if sync:
        sync()
    dt = now() - t0
    return dt / inner, LOAD.others(s0, LOAD.snap())


def alternate(ours, theirs, repeats: int, inner: int = 1, sync=None, log=None,
              extra: int | None = None, threshold: float = 0.1, max_wait: float = 30.0,
              clock: str = "wall") -> Pairwise:
    """Pairs timing ours and theirs once each, AB, BA, AB, ..., until `repeats` undisturbed ones.

    Swapping which side goes first in every other pair cancels any systematic first/second bias
    (caches, allocator state, clock boost) in the median of the per-pair ratios. A pair during
    which other processes used >= `threshold` of the machine counts as disturbed: it is kept in
    the record but another pair is run in its place, up to `extra` more pairs (default
    repeats // 2), after waiting up to max_wait s for the machine to be quiet.
    """
    extra = repeats // 2 if extra is None else extra
    res = Pairwise(threshold=threshold)
    firsts = {"a": 0, "b": 0}  # undisturbed pairs with ours / theirs first
    i = 0
    while len(res.clean) < repeats and i < repeats + extra:
        if i and res.others[-1] >= threshold and max_wait > 0:
            wait_quiet(threshold, max_wait, log)
        # A disturbed pair is re-run in the same order, so the undisturbed ones stay balanced.
        order = [("a", ours), ("b", theirs)]
        if firsts["b"] < firsts["a"]:
            order.reverse()
        got, load = {}, 0.0
        for key, fn in order:
            got[key], o = time_call(fn, inner, sync, clock)
            load = max(load, o)
        res.a.append(got["a"])
        res.b.append(got["b"])
        res.others.append(load)
        if load < threshold:
            firsts[order[0][0]] += 1
        i += 1
        if log:
            flag = "" if load < threshold else "  DISTURBED"
            log(f"    pair {i} ({'ours' if order[0][0] == 'a' else 'theirs'} first): ours "
                f"{fmt_s(got['a'])}, theirs {fmt_s(got['b'])}, ratio {got['a'] / got['b']:.3f}"
                f", others used {load:.0%} of the CPUs{flag}")
    return res


def calibrate(fn, target_s: float = 0.2, cap: int = 200) -> int:
    """How many back-to-back calls make one timing sample of about target_s (min 1)."""
    t = time_call(fn)[0]
    return max(1, min(cap, int(target_s / max(t, 1e-6))))


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


# --------------------------------------------------------------------------- machine info

def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def versions() -> str:
    import diffusers
    import torch
    import transformers

    return (f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def today() -> str:
    return datetime.date.today().isoformat()


def replace_section(path: Path, marker: str, body: str) -> None:
    """Replace the text between <!-- {marker}:start --> and <!-- {marker}:end --> in path."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no {start} ... {end} markers; add them where the section goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body.rstrip()}\n{end}{tail}")
