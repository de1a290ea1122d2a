"""CPU benchmark: our UNet, VAE decode and text encoder against diffusers / transformers.

    python -m bench.modules                       # full SD 2.1 (random weights) and tiny, ~10 min
    python -m bench.modules --threads 1 --clock cpu   # the same on a shared (busy) machine
    python -m bench.modules --config tiny         # seconds
    python -m bench.modules --write               # also update the CPU section of BENCHMARKS.md
    python -m bench.modules --config sd2.1-base --components unet --unet-batch 1 --repeats 1 \
        --threads 1 --clock cpu --profile         # where the UNet's time goes, op by op

Method. Per module and config: build ours with random init (the module classes exactly as
sd.weights.build constructs them, one component at a time to keep memory low), build the
reference on the meta device and load a copy of OUR state dict into it, so both compute with the
same weights in the same dtype (fp32) and thread count. Under torch.inference_mode(): warm up
both (the warm-up outputs are compared: max abs diff), then time `repeats` pairs, each pair
running ours and theirs once, ours first in one pair and theirs first in the next. Small models
run several calls per sample (about 0.2 s per sample). Reported: the median seconds per call of
each, the median of the per-pair ratios ours/theirs (< 1: ours faster), and the smallest and
largest per-pair ratio. With the wall clock (default), pairs during which other processes used
>= 10% of the CPUs are re-run (see bench.common.alternate); with --clock cpu the CPU time of the
process is timed instead, which ignores time spent descheduled (use it with --threads 1).
"""

import argparse
import gc
import sys
import time
from dataclasses import dataclass

from bench import common
from sd import cli
from sd.config import ModelConfig

REFERENCE = {"unet": "diffusers UNet2DConditionModel", "vae": "diffusers AutoencoderKL.decode",
             "text": "transformers CLIPTextModel"}
OURS = {"unet": "UNet", "vae": "VAE.decode", "text": "TextEncoder"}


@dataclass
class Case:
    cfg: ModelConfig
    component: str  # "unet", "vae" (decode) or "text"
    batch: int
    side: int  # latent side for unet/vae; tokens for text
    repeats: int
    note: str = ""

    @property
    def full(self) -> bool:
        return self.cfg.name != "tiny"

    @property
    def input(self) -> str:
        if self.component == "text":
            return f"{self.batch} x {self.side} tokens"
        px = f" ({self.side * 8} px)"
        return f"{self.batch} x 4 x {self.side} x {self.side}{px}"


def log(msg: str) -> None:
    print(msg, flush=True)


def build_models(cfg: ModelConfig, component: str):
    """(ours, theirs): ours with random init, theirs holding a copy of our weights. fp32, CPU."""
    import torch

    from sd.clip import TextEncoder
    from sd.unet import UNet
    from sd.vae import VAE

    torch.manual_seed(0)
    if component == "unet":
        ours = UNet(cfg.unet)
        theirs = common.reference_unet(cfg, ours.state_dict())
    elif component == "vae":
        ours = VAE(cfg.vae)
        theirs = common.reference_vae(cfg, ours.state_dict())
    elif component == "text":
        ours = TextEncoder(cfg.text)
        theirs = common.reference_text(cfg, ours.state_dict())
    else:
        raise ValueError(component)
    return ours.eval().requires_grad_(False), theirs


def calls(case: Case, ours, theirs):
    """Zero-argument callables running ours and theirs on the same random input."""
    import torch

    cfg, b, s = case.cfg, case.batch, case.side
    g = torch.Generator().manual_seed(0)
    if case.component == "unet":
        x = torch.randn(b, cfg.unet.in_channels, s, s, generator=g)
        ctx = torch.randn(b, cfg.text.max_len, cfg.unet.context_dim, generator=g)
        t = torch.tensor([999, 500, 17, 1] * b)[:b]
        return (lambda: ours(x, t, ctx)), (lambda: theirs(x, t, ctx).sample)
    if case.component == "vae":
        z = torch.randn(b, cfg.vae.latent_channels, s, s, generator=g)
        return (lambda: ours.decode(z)), (lambda: theirs.decode(z).sample)
    ids = torch.randint(0, cfg.text.vocab_size, (b, s), generator=g)
    return (lambda: ours(ids)), (lambda: theirs(ids).last_hidden_state)


def run_case(case: Case, ours, theirs, threads: int, profile: bool = False,
             clock: str = "wall") -> dict:
    import torch

    log(f"\n== {case.cfg.name} {OURS[case.component]} vs {REFERENCE[case.component]}, "
        f"input {case.input}, {case.repeats} pairs")
    f_ours, f_theirs = calls(case, ours, theirs)
    with torch.inference_mode():
        # Warm-up (first calls pay for oneDNN primitive creation and allocator growth), and the
        # check that both sides compute the same thing.
        t0 = time.perf_counter()
        a = f_ours()
        t_a = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = f_theirs()
        t_b = time.perf_counter() - t0
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        del a, b
        log(f"  warm-up: ours {common.fmt_s(t_a)}, theirs {common.fmt_s(t_b)}; "
            f"max abs diff {diff:.3g} (output max {scale:.3g})")
        inner = 1
        if not case.full:
            for _ in range(2):
                f_ours(), f_theirs()
            inner = max(common.calibrate(f_ours), common.calibrate(f_theirs))
            log(f"  {inner} calls per sample")
        if clock == "wall":  # wall time: wait for, flag and re-run pairs disturbed by others
            common.wait_quiet(0.1, 30.0, log)
            res = common.alternate(f_ours, f_theirs, case.repeats, inner, log=log)
        else:  # CPU time does not count descheduled time: no waiting, no re-runs
            res = common.alternate(f_ours, f_theirs, case.repeats, inner, log=log, extra=0,
                                   threshold=2.0, max_wait=0, clock=clock)
        prof = profile_pair(f_ours, f_theirs, inner if not case.full else 2) if profile else None
    out = res.summary()
    out.update(case=case, diff=diff, scale=scale, threads=threads, inner=inner, profile=prof)
    log(f"  ours {common.fmt_s(out['ours'])}, theirs {common.fmt_s(out['theirs'])}, "
        f"median ratio {out['ratio']:.3f} (min {out['ratio_min']:.3f}, max {out['ratio_max']:.3f})")
    return out


def run_all(todo: list[Case], threads: int, profile: bool = False,
            clock: str = "wall") -> list[dict]:
    """Run the cases, building each (config, component) pair once and freeing it after."""
    results, i = [], 0
    while i < len(todo):
        group = [c for c in todo[i:] if (c.cfg, c.component) == (todo[i].cfg, todo[i].component)]
        t0 = time.perf_counter()
        ours, theirs = build_models(todo[i].cfg, todo[i].component)
        log(f"\n[{todo[i].cfg.name} {todo[i].component}: built ours (random init) and the "
            f"reference (our weights copied) in {time.perf_counter() - t0:.1f} s, "
            f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters each]")
        for case in group:
            results.append(run_case(case, ours, theirs, threads, profile, clock))
        del ours, theirs
        gc.collect()
        i += len(group)
    return results


def profile_pair(f_ours, f_theirs, calls: int = 1) -> str:
    """torch.profiler, `calls` calls of each side: ops side by side by self CPU time.

    Rows are aten ops (self time: excluding children), sorted by |ours - theirs|, so the top
    rows say what costs more on which side; counts show structural differences (extra copies,
    extra elementwise kernels).
    """
    from torch.profiler import ProfilerActivity, profile

    stats: list[dict[str, list]] = [{}, {}]
    for i in range(calls):  # ours, theirs, then theirs, ours, ...: no first/second bias
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            with profile(activities=[ProfilerActivity.CPU]) as p:
                (f_ours, f_theirs)[side]()
            for e in p.key_averages():
                acc = stats[side].setdefault(e.key, [0, 0.0])
                acc[0] += e.count
                acc[1] += e.self_cpu_time_total / 1e3  # ms
    ours, theirs = stats
    names = sorted(set(ours) | set(theirs),
                   key=lambda k: -abs(ours.get(k, (0, 0))[1] - theirs.get(k, (0, 0))[1]))
    tot = [sum(v[1] for v in d.values()) for d in stats]
    lines = [(f"profile ({calls} call(s) each): self CPU total ours {tot[0]:.0f} ms, "
             f"theirs {tot[1]:.0f} ms"),
             (f"{'op':<44} {'calls ours':>10} {'theirs':>8} {'ms ours':>10} {'theirs':>10} "
             f"{'diff':>9}")]
    for k in names[:30]:
        (ca, ta), (cb, tb) = ours.get(k, (0, 0.0)), theirs.get(k, (0, 0.0))
        lines.append(f"{k[:44]:<44} {ca:>10} {cb:>8} {ta:>10.1f} {tb:>10.1f} {ta - tb:>+9.1f}")
    text = "\n".join(lines)
    log(text)
    return text


def cases(configs: list[str], components: list[str], repeats: int | None,
          unet_batches: list[int], unet_side: int | None, vae_side: int | None,
          text_batch: int) -> list[Case]:
    out = []
    for name in configs:
        cfg = common.config(name)
        full = cfg.name != "tiny"
        latent = cfg.resolution // 8
        for comp in components:
            if comp == "unet":
                for b in unet_batches:
                    # even counts: as many pairs with ours first as with theirs first
                    n = (6 if b == 1 else 4) if full else 20
                    out.append(Case(cfg, "unet", b, unet_side or latent, repeats or n))
            elif comp == "vae":
                side = vae_side or (32 if full else latent)
                note = ""
                if full and side < latent:
                    note = (f"decode at {side}x{side} latent, not {latent}x{latent}: "
                            "one full-size decode takes over 20 s on this CPU")
                out.append(Case(cfg, "vae", 1, side, repeats or (6 if full else 20), note))
            elif comp == "text":
                out.append(Case(cfg, "text", text_batch, cfg.text.max_len,
                                repeats or (10 if full else 20)))
            else:
                raise SystemExit(f"unknown component {comp!r} (unet, vae, text)")
    return out


def pairs(r: dict) -> str:
    n = str(r["pairs"])
    if r["total_pairs"] > r["pairs"]:
        n += f" of {r['total_pairs']}"
    if not r["all_clean"]:
        n += " (all disturbed)"
    if r["inner"] > 1:
        n += f", {r['inner']} calls each"
    return n


def table(results: list[dict], clock: str = "wall") -> str:
    rows = [("| config | module (ours vs reference) | input | ours | reference | "
            "ours/ref median ratio | ratio min-max | pairs | others' CPU use | max abs diff |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["case"]
        rows.append(
            f"| {c.cfg.name} | {OURS[c.component]} vs {REFERENCE[c.component]} | {c.input} | "
            f"{common.fmt_s(r['ours'])} | {common.fmt_s(r['theirs'])} | **{r['ratio']:.3f}** | "
            f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f} | {pairs(r)} | {r['others']:.0%} | "
            f"{r['diff']:.2g} (of {r['scale']:.2g}) |")
    notes = [f"- {r['case'].cfg.name} {OURS[r['case'].component]}: {r['case'].note}"
             for r in results if r["case"].note]
    pairs_doc = ("Pairs: undisturbed pairs used (\"of N\": N run; a pair is disturbed when "
                 "other processes used >= 10% of the CPUs during it, and is then re-run)."
                 if clock == "wall" else
                 "Pairs: all pairs run (CPU time: no waiting or re-runs for other load).")
    legend = ("Times are medians of seconds per call; the ratio is the median of per-pair ratios "
              f"(< 1: ours faster). {pairs_doc} Others' CPU use: median over all pairs, of the "
              "whole machine. Max abs diff: ours vs reference on the same input (of: the "
              "output's max abs value).")
    return "\n".join(rows + [""] + notes + ([""] if notes else []) + [legend])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="sd2.1-base,tiny",
                   help="comma-separated presets: sd2.1-base (= sd21-base), sd2.1, tiny")
    p.add_argument("--components", default="unet,vae,text", help="comma-separated: unet,vae,text")
    p.add_argument("--repeats", type=int,
                   help="pairs per case; use an even number (default: full UNet 6 at batch 1, "
                   "4 at batch 2; full VAE 6; full text 10; tiny 20)")
    p.add_argument("--threads", type=int, default=common.cpu_cores(),
                   help="torch.set_num_threads (default: all cores)")
    p.add_argument("--unet-batch", default="1,2",
                   help="comma-separated UNet batch sizes (2 = one prompt under CFG)")
    p.add_argument("--unet-latent", type=int, help="UNet latent side (default resolution / 8)")
    p.add_argument("--vae-latent", type=int,
                   help="VAE decode latent side (default 32 for full configs, 8 for tiny)")
    p.add_argument("--text-batch", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (quiet machine); cpu: process CPU time, all threads "
                   "(robust on a shared machine)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile each side (2 calls for full models, alternating) "
                   "and print aten ops side by side, sorted by the self-CPU-time difference")
    p.add_argument("--write", action="store_true",
                   help="update the section of --out between the --section markers")
    p.add_argument("--section", default="cpu-results",
                   help="marker name: <!-- NAME:start --> ... <!-- NAME:end --> (default "
                   "cpu-results)")
    p.add_argument("--out", default=str(common.ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads > 1:
        log("warning: --clock cpu with several threads counts OpenMP threads spinning while a "
            "sibling is descheduled; on a busy machine use --threads 1 --clock cpu")
    start = time.perf_counter()
    machine = f"{common.cpu_name()}, {common.cpu_cores()} cores"
    log(f"{machine}; {common.versions()}; {torch.get_num_threads()} thread(s); fp32; "
        f"{args.clock} clock")
    todo = cases(args.config.split(","), args.components.split(","), args.repeats,
                 [int(b) for b in args.unet_batch.split(",")], args.unet_latent, args.vae_latent,
                 args.text_batch)
    results = run_all(todo, args.threads, args.profile, args.clock)
    elapsed = time.perf_counter() - start
    md = table(results, args.clock)
    log("\n" + md + f"\n\n(total {elapsed / 60:.1f} min)")

    if args.write:
        cmd = "python -m bench.modules" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
        clock = ("wall-clock time" if args.clock == "wall" else
                 "CPU time of the process (time.process_time)")
        body = (f"Measured {common.today()} on {machine} (lscpu), "
                f"{torch.get_num_threads()} thread(s) (torch.set_num_threads), {clock}, fp32, "
                f"torch.inference_mode(); {common.versions()}. "
                f"Command: `{cmd}`, {elapsed / 60:.1f} min in all.\n\n{md}\n")
        common.replace_section(common.Path(args.out), args.section, body)
        log(f"wrote the {args.section} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
