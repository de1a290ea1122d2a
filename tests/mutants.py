"""`make mutants`: prove the tests catch the bugs that matter, one planted bug at a time.

Each mutant is a one-line bug (a few are two coordinated lines) with the tests that must catch
it. For each: copy the repository (the files git knows, tracked or not ignored) to a temporary
folder, apply the mutant there, run its tests with this Python from inside the copy, and record
which test failed. The original text must occur exactly once in its file, so a moved or edited
line stops the run instead of silently testing nothing. Exit status 1 if any mutant survives.

    python tests/mutants.py              # all
    python tests/mutants.py eps scaling  # the mutants whose name contains any of these words
    python tests/mutants.py --list
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (exact original text, replacement)
    tests: tuple[str, ...]  # pytest node ids, any of which must fail


def m(name: str, file: str, original: str, replacement: str, *tests: str) -> Mutant:
    return Mutant(name, file, ((original, replacement),), tests)


MODULES, PIPE, CTRL = "tests/test_modules.py", "tests/test_pipeline.py", "tests/test_controls.py"
OFFICIAL = "tests/test_official.py::test_swap_equals_the_official_algorithm["
METHODS = "tests/test_methods.py::test_masactrl_equals_the_official_algorithm["
PNP = "tests/test_methods.py::test_pnp_equals_the_official_algorithm["
MUTANTS = [
    # Seven that the suite once missed.
    m("unet resnet GroupNorm eps 1e-5 -> 1e-6", "sd/unet.py",
      "return ResBlock(c_in, c_out, groups, emb_dim, eps=1e-5)",
      "return ResBlock(c_in, c_out, groups, emb_dim, eps=1e-6)",
      f"{MODULES}::test_norm_eps_at_small_variance"),
    m("attention_map without 1/sqrt(d)", "sd/attention.py",
      "scores = (wide(q) @ wide(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])",
      "scores = wide(q) @ wide(k).transpose(-1, -2)",
      f"{CTRL}::test_heat_map_reads_cond_half_tokens_and_orientation",
      f"{CTRL}::test_heat_map_in_the_pipeline_matches_a_reference"),
    m("HeatMap reads the unconditional half", "sd/controls.py",
      "cond = attn[-self.prompts:].mean(1)[..., self.tokens]",
      "cond = attn[:self.prompts].mean(1)[..., self.tokens]",
      f"{CTRL}::test_heat_map_reads_cond_half_tokens_and_orientation"),
    m("HeatMap reads the next token's column", "sd/controls.py",
      "cond = attn[-self.prompts:].mean(1)[..., self.tokens]",
      "cond = attn[-self.prompts:].mean(1)[..., [i + 1 for i in self.tokens]]",
      f"{CTRL}::test_heat_map_reads_cond_half_tokens_and_orientation"),
    m("HeatMap transposed (h and w swapped)", "sd/controls.py",
      "maps = cond.transpose(1, 2).reshape(self.prompts, len(self.tokens), *site.shape(self.hw))",
      "maps = cond.transpose(1, 2).reshape(self.prompts, len(self.tokens), "
      "*site.shape(self.hw)[::-1])",
      f"{CTRL}::test_heat_map_reads_cond_half_tokens_and_orientation"),
    Mutant("CFG layout [cond, uncond] (guidance still right)", "sd/pipeline.py", (
        ("out = self.models.unet(torch.cat([x, x]), t, torch.cat([uncond, cond]), ctrl)",
         "out = self.models.unet(torch.cat([x, x]), t, torch.cat([cond, uncond]), ctrl)"),
        ("out_uncond, out_cond = out.chunk(2)", "out_cond, out_uncond = out.chunk(2)")),
        (f"{CTRL}::test_control_sees_uncond_then_cond",)),
    m("explicit scores in fp16 (no upcast)", "sd/attention.py",
      "scores = (wide(q) @ wide(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])",
      "scores = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).float()",
      "tests/test_fp16.py::test_scores_that_overflow_fp16_stay_finite_and_right"),
    # Worth adding: converter and VAE bugs that load without error.
    m("single-file text converter: q and k swapped", "sd/ldm.py",
      'for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):',
      'for name, part in zip(("k", "q", "v"), v.chunk(3, dim=0)):',
      "tests/test_weights.py::test_single_file_matches_diffusers_converter"),
    m("VAE scaling factor 0.18215 -> 0.18125", "sd/config.py",
      "scaling: float = 0.18215", "scaling: float = 0.18125",
      f"{PIPE}::test_pipeline_parity"),
    # Numerics that hand-written versions get wrong.
    m("unet transformer GroupNorm eps 1e-6 -> 1e-5", "sd/unet.py",
      "self.norm = GroupNorm(groups, dim, eps=1e-6)",
      "self.norm = GroupNorm(groups, dim, eps=1e-5)",
      f"{MODULES}::test_norm_eps_at_small_variance"),
    m("unet conv_norm_out eps 1e-5 -> 1e-6", "sd/unet.py",
      "self.conv_norm_out = GroupNorm(groups, ch[0], eps=1e-5)",
      "self.conv_norm_out = GroupNorm(groups, ch[0], eps=1e-6)",
      f"{MODULES}::test_norm_eps_at_small_variance"),
    m("VAE GroupNorm eps 1e-6 -> 1e-5", "sd/vae.py", "EPS = 1e-6", "EPS = 1e-5",
      f"{MODULES}::test_norm_eps_at_small_variance"),
    m("timestep embedding [sin, cos]", "sd/unet.py",
      "return torch.cat([angles.cos(), angles.sin()], dim=-1)",
      "return torch.cat([angles.sin(), angles.cos()], dim=-1)",
      f"{MODULES}::test_unet_parity"),
    m("GEGLU halves swapped", "sd/unet.py",
      "value, gate = self.proj(x).chunk(2, dim=-1)", "gate, value = self.proj(x).chunk(2, dim=-1)",
      f"{MODULES}::test_unet_parity"),
    m("VAE downsampling pads top-left", "sd/blocks.py",
      "return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)",
      "return self.conv(F.pad(x, (1, 0, 1, 0)) if self.asymmetric else x)",
      f"{MODULES}::test_vae_encode_parity"),
    m("CLIP without the causal mask", "sd/clip.py",
      'return self.out_proj(rearrange(attention(q, k, v, causal=True), "b h n d -> b n (h d)"))',
      'return self.out_proj(rearrange(attention(q, k, v, causal=False), "b h n d -> b n (h d)"))',
      f"{MODULES}::test_text_encoder_parity"),
    m("CLIP final LayerNorm skipped", "sd/clip.py",
      "return self.final_layer_norm(x)", "return x", f"{MODULES}::test_text_encoder_parity"),
    m("DDIM final alpha 1 (set_alpha_to_one)", "sd/ddim.py",
      "return ac[int(t)] if t >= 0 else ac[0]", "return ac[int(t)] if t >= 0 else ac.new_ones(())",
      "tests/test_ddim.py::test_alphas_cumprod_exact"),
    m("guidance from the conditional output", "sd/pipeline.py",
      "return out_uncond + guidance * (out_cond - out_uncond)",
      "return out_cond + guidance * (out_cond - out_uncond)", f"{PIPE}::test_pipeline_parity"),
    m("decode multiplies by the scaling", "sd/pipeline.py",
      "images = self.models.vae.decode(latents / self.cfg.vae.scaling)",
      "images = self.models.vae.decode(latents * self.cfg.vae.scaling)",
      f"{PIPE}::test_pipeline_parity"),
    m("control told the step off by one", "sd/pipeline.py",
      "ctrl.step, ctrl.t = i, t", "ctrl.step, ctrl.t = i + 1, t",
      f"{PIPE}::test_control_is_told_step_and_layout"),
    m("StoreMaps keeps head 0, not the mean", "sd/controls.py",
      "stored = attn.mean(1) if self.head_mean else attn",
      "stored = attn[:, 0] if self.head_mean else attn",
      f"{CTRL}::test_store_maps_records_each_site_once_per_step"),
    m("Site.shape: a downsampler floors odd sides", "sd/attention.py",
      "return tuple(-(-n // 2**self.level) for n in latent_hw)",
      "return tuple(n // 2**self.level for n in latent_hw)",
      f"{CTRL}::test_heat_map_in_the_pipeline_matches_a_reference"),
    m("HeatMap includes the mid block (DAAM leaves it out)", "sd/controls.py",
      'if site.kind != "cross" or site.place == "mid":', 'if site.kind != "cross":',
      f"{CTRL}::test_heat_map_in_the_pipeline_matches_a_reference"),
    m("word_indices off by one (BOS forgotten)", "sd/tokenizer.py",
      "found += [i + 1 for span, _, _ in kept[k : k + n] for i in span]",
      "found += [i for span, _, _ in kept[k : k + n] for i in span]",
      f"{CTRL}::test_word_indices_multi_token_and_repeated_words"),
    m("causal mask off by one (a token sees the next)", "sd/attention.py",
      "mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)",
      "mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(2)",
      "tests/test_attention.py::test_fused_equals_explicit"),
    m("UNet upsamples 2x whatever the skip's size", "sd/unet.py",
      "x = block.upsamplers[0](x, size=skips[-1].shape[-2:])", "x = block.upsamplers[0](x)",
      f"{MODULES}::test_unet_parity"),
    m("converter keeps OpenCLIP's 24th text block", "sd/ldm.py",
      "if n >= layers:", "if n > layers:",
      "tests/test_weights.py::test_single_file_matches_diffusers_converter"),
    m("null-text: no learning-rate decay", "sd/inversion.py",
      "opt = torch.optim.Adam([emb], lr=lr * (1 - i / 100), eps=1e-8 * scale)",
      "opt = torch.optim.Adam([emb], lr=lr, eps=1e-8 * scale)",
      "tests/test_inversion.py::test_matches_the_notebook"),
    # The toy world: a swap whose control is dropped is the `none` baseline. The toy
    # test runs first and catches it where a trained toy model exists (weights/toy, or
    # TOY_WEIGHTS); without one it skips and the tiny model's recorder test catches it instead.
    m("swap runs without its control (no swaps, no blend)", "photoswap/swap.py",
      "ctrl, progress=progress, callback=ctrl.callback)",
      "None, progress=progress, callback=None)",
      "tests/test_toy_swap.py::test_photoswap_keeps_the_background_and_layout_better_than_none",
      "tests/test_swap_runner.py::test_recorder_changes_nothing_and_draws"),
    m("local blend never applied", "photoswap/control.py",
      "mask = self.mask(x, step)", "mask = None",
      "tests/test_toy_swap.py::test_photoswap_keeps_the_background_and_layout_better_than_none"),
    m("phi (self-attention output) never taken", "photoswap/control.py",
      "phi = self._rows(b, s.phi.half) if self._on(s.phi, site) else ([], [])",
      "phi = ([], [])",
      "tests/test_toy_swap.py::test_photoswap_keeps_the_background_and_layout_better_than_none"),
    # The official algorithm (tests/test_official.py's reference in diffusers).
    m("refinement mapper: padding off by one", "photoswap/align.py",
      "list(range(len(y), size))", "list(range(len(y) - 1, size - 1))",
      OFFICIAL + "unequal length-float64]"),
    m("local blend reads the maps before the A swap", "photoswap/control.py",
      'if a.half != "uncond" and self._on(a, site):', "if False:",
      OFFICIAL + "p2p refine + blend-float64]"),
    m("phi window one step short", "photoswap/settings.py",
      '"f*T+1": lambda f, steps: int(f * steps) + 1}', '"f*T+1": lambda f, steps: int(f * steps)}',
      OFFICIAL + "equal length-float64]"),
    # MasaCtrl and its official algorithm (tests/test_methods.py).
    m("MasaCtrl starts one step late", "photoswap/masactrl.py",
      "self.step < s.start_step", "self.step <= s.start_step",
      METHODS + "prompt-float64]"),
    m("MasaCtrl skips the decoder's level-1 blocks", "photoswap/settings.py",
      'layers: Layers = Layers(places=("up",), max_level=1)',
      'layers: Layers = Layers(places=("up",), max_level=0)',
      METHODS + "prompt-float64]"),
    m("PnP injects features one step too long", "photoswap/pnp.py",
      "if self.step >= end(self.settings.features, self.steps)",
      "if self.step > end(self.settings.features, self.steps)",
      PNP + "float64]"),
    m("PnP injects another resnet of the block", "photoswap/settings.py",
      "feature_index: int = 1", "feature_index: int = 0", PNP + "float64]"),
    m("quick-GELU with another constant (SD 1.x text encoder)", "sd/clip.py",
      "return x * torch.sigmoid(1.702 * x)", "return x * torch.sigmoid(1.6 * x)",
      "tests/test_sd1.py::test_modules_equal_the_references_in_both_layouts"),
    m("SD 1.x pads with 0, as SD 2.x does", "sd/config.py",
      "text=TextConfig(width=768, layers=12, heads=12, mlp_width=3072, pad_id=49407,",
      "text=TextConfig(width=768, layers=12, heads=12, mlp_width=3072, pad_id=0,",
      "tests/test_sd1.py::test_50_step_pipeline_equals_diffusers"),
    m("the toy DreamBooth without prior preservation", "toy/settings.py",
      '"seed": 0,\n              "num_class_images": 50}', '"seed": 0}',
      "tests/test_toy_model.py::test_dreambooth_teaches_a_concept"),
]


def copy_tree(dest: Path) -> None:
    """The files git knows (tracked, or untracked and not ignored), so a fresh clone's state."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check(mutant: Mutant) -> str:
    """The mutated file's text; refuses unless each original occurs exactly once."""
    text = (ROOT / mutant.file).read_text()
    for original, _ in mutant.edits:
        count = text.count(original)
        if count != 1:
            raise SystemExit(f"mutant {mutant.name!r}: {original!r} occurs {count} times in "
                             f"{mutant.file} (expected once): update tests/mutants.py")
        text = text.replace(original, _)
    return text


def run(mutant: Mutant, tree: Path) -> tuple[str, float]:
    """Apply, run the tests, restore; returns (what caught it or MISSED/ERROR, seconds)."""
    target = tree / mutant.file
    original = target.read_text()
    target.write_text(check(mutant))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS":
           os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p",
                            "no:cacheprovider", *mutant.tests], cwd=tree, env=env,
                           capture_output=True, text=True, check=False)
    finally:
        target.write_text(original)
    seconds = time.monotonic() - start
    if r.returncode == 0:
        return "MISSED", seconds
    failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    if r.returncode != 1 or not failed:  # collection error, crash: not a test catching a bug
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return "ERROR (exit %d): %s" % (r.returncode, " | ".join(tail)), seconds
    return failed[0].removeprefix("tests/"), seconds


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for mu in MUTANTS:
            print(f"{mu.name:50s} {mu.file:20s} {' '.join(mu.tests)}")
        return 0
    chosen = [mu for mu in MUTANTS if not argv or any(a in mu.name for a in argv)]
    for mu in chosen:
        check(mu)  # every original text must be found before anything runs
    rows, total = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        probe = subprocess.run([sys.executable, "-c", "import sd; print(sd.__file__)"], cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                               text=True, check=True).stdout.strip()
        assert probe.startswith(str(tree)), f"the copy imports sd from {probe}, not from {tree}"
        print(f"{'mutant':48s} {'caught by':82s} seconds")
        for mu in chosen:
            verdict, seconds = run(mu, tree)
            rows.append(verdict)
            print(f"{mu.name:48s} {verdict:82s} {seconds:7.1f}", flush=True)
    bad = sum(not v or v == "MISSED" or v.startswith("ERROR") for v in rows)
    print(f"{len(rows) - bad} of {len(rows)} mutants caught in {time.monotonic() - total:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
