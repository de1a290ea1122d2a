"""The toy model's preset, pretraining pieces and judge (fast: tiny data, a few steps)."""

import json
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from sd import ddim
from sd.config import TOY, preset
from sd.errors import WeightsError
from sd.pipeline import Pipeline
from sd.weights import build
from toy import data as toydata
from toy import judge, pretrain
from train import UsageError
from train.checkpoints import save
from train.loop import EMA, Run, Settings, fit, lr_at

# Below the committed judge's accuracy on held-out renders (on these 300: shape 96.0%, colour
# 83.3%, texture 96.0%; weights/toy/README.md) by a margin for other CPUs: a judge that reads
# shape, colour or texture worse fails.
JUDGE_FLOOR = 0.78


def test_toy_preset_shapes_and_size():
    assert preset("toy") is TOY and TOY.vae.factor == 4
    models = build(TOY)
    z = models.vae.encode(torch.zeros(1, 3, 64, 64)).mean
    assert z.shape == (1, 8, 16, 16)  # 8 latent channels (sd/config.py says why)
    params = sum(p.numel() for m in (models.vae, models.unet, models.text_encoder)
                 for p in m.parameters())
    assert 2 * params < 30e6, "fp16 weights must fit the 30 MB budget of weights/toy"
    assert TOY.text.vocab_size == 49408 and TOY.schedule == preset("sd2.1-base").schedule


def test_vae_loss_trains():
    torch.manual_seed(0)
    vae = build(TOY).vae
    g = torch.Generator().manual_seed(0)
    images, _ = toydata.pool("train", 8, progress=False)
    x = toydata.crops(images, 4, 32, g)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    opt = torch.optim.Adam(vae.parameters(), 1e-3)
    losses = []
    for _ in range(5):
        loss = pretrain.vae_loss(vae, x, g, 1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_caption_dropout_means_the_empty_prompt():
    torch.manual_seed(0)
    model = pretrain.Stage2(TOY)
    ids = pretrain.token_ids(["a photo of a red circle on a blue background"] * 2, TOY)
    empty = pretrain.token_ids([""], TOY)
    c = TOY.vae.latent_channels
    batch = {"mean": torch.randn(2, c, 16, 16), "std": torch.zeros(2, c, 16, 16), "ids": ids,
             "empty": empty, "ac": ddim.alphas_cumprod(TOY.schedule)}
    run = lambda b, drop: pretrain.diffusion_loss(  # noqa: E731
        model, b, torch.Generator().manual_seed(3), TOY, drop, 5.0)
    with torch.no_grad():
        dropped = run(batch, 1.0)
        assert torch.equal(dropped, run({**batch, "ids": empty.expand(2, -1)}, 0.0))
        assert not torch.equal(dropped, run(batch, 0.0))


# ------------------------------------------------------------------ the loop pretraining uses

def line_fit(out, steps=9, killed=None, ema=0.9, seen=None, **settings):
    """fit() on y = x1 + x2 + x3 with a 3 -> 1 linear model, warmup 2, cosine, EMA 0.9, a
    checkpoint and an evaluation every 3 steps; resumes when out/latest exists. `seen` collects
    (step, weights the loss saw); saving checkpoint `killed` raises KeyboardInterrupt."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    average = EMA(model, ema) if ema else None

    def loss(m, g, micro):
        if seen is not None:
            seen.append((micro, torch.cat([m.weight.flatten(), m.bias]).detach().clone()))
        x = torch.randn(8, 3, generator=g)
        return ((m(x) - x.sum(1, keepdim=True)) ** 2).mean()

    def evaluate(m, step):
        assert m is (average.module if average else model)  # the EMA is what is evaluated
        return {"bias": m.bias.item()}

    s = Settings(out, steps, 0.1, warmup_steps=2, schedule="cosine", checkpoint_every=3,
                 validate_every=3, seed=1, quiet=True, max_grad_norm=0.0,
                 resume="latest" if (out / "latest").exists() else None, **settings)
    def write(folder):
        if folder.name == f"checkpoint-{killed}.tmp":
            raise KeyboardInterrupt  # after the evaluation of that step was logged
        torch.save(model.state_dict(), folder / "model.pt")

    losses = fit(Run(quiet=True), s, model, list(model.parameters()), loss, write,
                 lambda folder: model.load_state_dict(torch.load(folder / "model.pt")),
                 evaluate=evaluate, ema=average)
    return model, average, losses


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    s = Settings(Path("."), steps=102, lr=1.0, warmup_steps=2, schedule="cosine", final_lr=0.1)
    lrs = [lr_at(s, k) for k in range(102)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # linear warmup from lr / warmup, then the cosine's top
    assert abs(lrs[52] - 0.55) < 1e-12  # halfway: (1 + floor) / 2
    assert abs(lr_at(s, 102) - 0.1) < 1e-12 and all(a > b for a, b in pairwise(lrs[2:]))
    assert [lr_at(replace(s, schedule="constant"), k) for k in (0, 1, 50)] == [0.5, 1.0, 1.0]


def test_ema_is_the_documented_average(tmp_path):
    seen = []
    model, ema, _ = line_fit(tmp_path, steps=5, seen=seen)
    trajectory = [w for _, w in seen[1:]] + [torch.cat([model.weight.flatten(), model.bias])]
    expected = seen[0][1].double()  # the average starts at the initial weights
    for n, w in enumerate(trajectory):  # after step n: decay min(0.9, (1 + n) / (10 + n))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w.double()
    got = torch.cat([ema.module.weight.flatten(), ema.module.bias]).double()
    assert (got - expected).abs().max() < 1e-6 * expected.abs().max()
    assert not torch.allclose(got, trajectory[-1].double())  # it lags the model


def test_fit_resumed_after_a_kill_equals_fit_in_one_go(tmp_path):
    model, ema, losses = line_fit(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # killed saving step 9: resumes from step 6
        line_fit(tmp_path / "b", killed=9)
    assert (tmp_path / "b" / "log.csv").read_text().count("\n9,") == 1
    resumed, resumed_ema, tail = line_fit(tmp_path / "b")
    loaded, loaded_ema, rest = line_fit(tmp_path / "b")  # nothing left to do: loads step 9
    assert tail == losses[6:] and rest == []
    for other in [(resumed, resumed_ema), (loaded, loaded_ema)]:
        for a, b in zip((model, ema.module), (other[0], other[1].module)):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                         b.state_dict().values()))

    def rows(run):  # without the seconds column, which depends on the machine
        lines = (tmp_path / run / "log.csv").read_text().splitlines()
        return [line.split(",")[:1] + line.split(",")[2:] for line in lines]

    assert rows("b") == rows("a")  # the row of step 9 written once more, not twice
    assert [r[0] for r in rows("b")] == ["step", "3", "6", "9"] and rows("b")[0][-1] == "bias"


def test_judge_reads_labels_it_was_given():
    x, shapes, colours, textures = judge.labelled(range(6), "test")
    assert x.shape == (6, 3, 64, 64)
    got_shapes, got_colours, got_textures = judge.predict(judge.Judge(), x)
    assert len(got_shapes) == 6 and set(got_colours) <= set(judge.COLOURS)
    assert set(got_textures) <= set(judge.TEXTURES)
    assert shapes.max() < len(judge.SHAPES) and textures.max() < len(judge.TEXTURES)
    assert torch.allclose(colours.sum(1), torch.ones(6))  # a two-tone's colour: half and half


def test_committed_judge_reads_held_out_scenes():
    # Held-out scenes beyond the 1,000 the judge was scored on when trained.
    got = judge.accuracy(judge.load("weights/toy/judge.safetensors"), range(2000, 2300))
    assert min(got.values()) >= JUDGE_FLOOR, got


def test_export_reads_fit_checkpoints(tmp_path):
    """A run folder with a VAE and a UNet stage checkpointed by fit: export writes the EMA, not
    the live weights, and Pipeline.load reads it."""
    torch.manual_seed(0)
    vae, model = build(TOY).vae, pretrain.Stage2(TOY)
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    (tmp_path / "vae.json").write_text('{"scaling": 0.9}')
    ema = EMA(model, 0.999)
    with torch.no_grad():
        ema.module.unet.conv_in.bias.fill_(0.25)  # so exporting the live weights would show
    (tmp_path / "unet").mkdir()
    save(tmp_path / "unet", 5, ema.save, {"step": 5})  # fit's layout: checkpoint-5/ema.safetensors
    assert pretrain.export(tmp_path, tmp_path / "new")["bytes"] < 30e6
    for folder in ("new",):
        pipe = Pipeline.load(preset("toy"), tmp_path / folder, "cpu", torch.float32)
        assert torch.equal(pipe.models.unet.conv_in.bias, torch.full_like(model.unet.conv_in.bias,
                                                                          0.25))
        config = json.loads((tmp_path / folder / "vae" / "config.json").read_text())
        assert config["scaling_factor"] == 0.9  # the measured one, from vae.json
        assert pipe.cfg.vae.scaling == 0.9  # and the one the pipeline scales latents by
    (tmp_path / "new" / "vae" / "config.json").write_text('{"scaling_factor": 0.9')
    with pytest.raises(WeightsError, match="config.json: not a readable JSON object"):
        Pipeline.load(preset("toy"), tmp_path / "new", "cpu", torch.float32)


def test_the_decoder_stage_leaves_the_encoder_and_export_takes_its_decoder(tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = build(TOY).vae
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    (tmp_path / "vae.json").write_text('{"scaling": 0.9}')
    monkeypatch.setitem(pretrain.DECODER_RECIPE, "pool", 16)
    monkeypatch.setitem(pretrain.DECODER_RECIPE, "steps", 2)
    monkeypatch.setitem(pretrain.DECODER_RECIPE, "every", 1)
    tuned = pretrain.train_decoder(tmp_path, 0, progress=False)
    before, after = vae.state_dict(), tuned.state_dict()
    for k in before:
        frozen = k.startswith(("encoder.", "quant_conv."))
        assert torch.equal(before[k], after[k]) == frozen, k
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    model = pretrain.Stage2(TOY)
    (tmp_path / "unet").mkdir()
    save(tmp_path / "unet", 1, EMA(model, 0.999).save, {"step": 1})
    pretrain.export(tmp_path, tmp_path / "new")
    pipe = Pipeline.load(preset("toy"), tmp_path / "new", "cpu", torch.float32)
    exported = pipe.models.vae.decoder.conv_out.weight
    assert torch.allclose(exported, after["decoder.conv_out.weight"].half().float())


def test_stage_2b_starts_from_stage_2s_last_ema_and_export_takes_its_own(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(build(TOY).vae.state_dict(), tmp_path / "vae.pt")
    (tmp_path / "vae.json").write_text('{"scaling": 0.9}')
    (tmp_path / "unet").mkdir()

    def checkpoint(folder: str, step: int, bias: float) -> None:
        ema = EMA(pretrain.Stage2(TOY), 0.999)
        with torch.no_grad():
            ema.module.unet.conv_in.bias.fill_(bias)
        save(tmp_path / folder, step, ema.save, {"step": step})

    calls = []
    monkeypatch.setattr(pretrain, "train_unet", lambda *a: calls.append(a))
    monkeypatch.setitem(pretrain.UNET_RECIPE, "steps", 4)
    checkpoint("unet", 3, 0.25)  # stage 2 interrupted: 2b refuses to start from it
    with pytest.raises(UsageError, match="stage 2 has not finished"):
        pretrain.train_unet_more(tmp_path, 0, False)
    checkpoint("unet", 4, 0.5)
    pretrain.train_unet_more(tmp_path, 0, False)
    (_, _, _, recipe, folder, init, more), = calls
    assert (recipe, folder, more) == (pretrain.UNET_MORE, "unet-more", None)
    assert torch.equal(init["unet.conv_in.bias"], torch.full((32,), 0.5))
    (tmp_path / "unet-more").mkdir()
    checkpoint("unet-more", 2, 0.75)
    pretrain.export(tmp_path, tmp_path / "new")
    pipe = Pipeline.load(preset("toy"), tmp_path / "new", "cpu", torch.float32)
    assert torch.equal(pipe.models.unet.conv_in.bias, torch.full((32,), 0.75))


@pytest.mark.parametrize("killed_in", ["json.dumps", "torch.save"])
def test_a_kill_while_the_vae_stage_saves_leaves_no_stamp_without_its_scale(tmp_path, monkeypatch,
                                                                          killed_in):
    """vae.pt is make's stamp for stage 1, and the later stages read vae.json beside it: stopped
    in either write, the stage leaves no vae.pt (so make reruns it) and no temporary."""
    torch.manual_seed(0)
    vae = build(TOY).vae
    images = toydata.pool("test", 4, None, False)[0]

    def kill(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(killed_in, kill)
        with pytest.raises(KeyboardInterrupt):
            pretrain.finish_vae(tmp_path, vae, images, toydata.to_tensor(images))
    assert [f.name for f in tmp_path.iterdir()] in ([], ["vae.json"])
    stats = pretrain.finish_vae(tmp_path, vae, images, toydata.to_tensor(images))
    assert json.loads((tmp_path / "vae.json").read_text()) == stats
    assert (tmp_path / "vae.pt").is_file()


def test_rerunning_a_killed_stage_resumes_it(tmp_path):
    recipe = {"steps": 7, "lr": 0.1, "warmup": 2, "weight_decay": 0.01, "every": 3}

    steps = []

    def run(out, kill_at=None):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        steps.clear()

        def loss(m, g, step):
            steps.append(step)
            if step == kill_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 3, generator=g)
            return ((m(x) - x.sum(1, keepdim=True)) ** 2).mean()

        s = pretrain.stage_settings(out, recipe, 1, False)
        return pretrain.stage(s, model, loss, lambda m, step: {}, EMA(model, 0.9))

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=5)  # after the checkpoint of step 3
    resumed = run(tmp_path / "b")
    assert steps == [3, 4, 5, 6]  # from the checkpoint, not from the start
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)
    assert (tmp_path / "b" / "latest").read_text().strip() == "checkpoint-7"


def test_the_toy_command_line_parses_without_torch_and_refuses_a_missing_stage(tmp_path):
    """`python -m toy COMMAND`: every command's arguments parse before torch loads (--help is
    instant); pretraining's later stages say which stage to run first, before writing anything."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    check = ("import sys; from toy.__main__ import parser; p = parser(); "
             "[p.parse_args(a) for a in (['pretrain', 'all', '-q'], ['swap', '--scene', '3'], "
             "['evaluate', '--scenes', '2'], ['identity', '-o', 'x'], "
             "['judge', '-o', 'x', '-q'])]; "
             "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "toy", "--help"], cwd=root, capture_output=True,
                       text=True)
    assert r.returncode == 0 and all(c in r.stdout for c in
                                     ("pretrain", "swap", "evaluate", "identity", "judge"))
    r = subprocess.run([sys.executable, "-m", "toy", "pretrain", "export", "--run",
                        str(tmp_path / "run"), "-o", str(tmp_path / "out")], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: no trained VAE"), r.stderr
    assert "python -m toy pretrain vae" in r.stderr and not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "toy", "pretrain", "unet", "--run",
                        str(tmp_path / "run"), "--more-threads", "two", "x"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --more-threads: N is"), r.stderr


def test_the_unet_stage_takes_more_threads_once_the_other_chains_file_exists(tmp_path,
                                                                             monkeypatch):
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.save(build(TOY).vae.state_dict(), tmp_path / "vae.pt")
    (tmp_path / "vae.json").write_text('{"scaling": 0.9}')
    monkeypatch.setitem(pretrain.UNET_RECIPE, "pool", 8)
    monkeypatch.setitem(pretrain.UNET_RECIPE, "batch", 2)
    monkeypatch.setitem(pretrain.UNET_RECIPE, "steps", 2)
    monkeypatch.setitem(pretrain.UNET_RECIPE, "every", 1)
    more = pretrain.MoreThreads(2, tmp_path / "decoder.pt")
    try:
        torch.set_num_threads(1)
        more.claim()
        assert torch.get_num_threads() == 1
        (tmp_path / "decoder.pt").touch()  # the other chain's last file
        pretrain.train_unet(tmp_path, 0, False, more=more)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
