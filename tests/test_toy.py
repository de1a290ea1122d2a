"""The toy model's preset, pretraining pieces and judge (fast: tiny data, a few steps)."""

import torch
from torch import nn

from sd import ddim
from sd.config import TOY, preset
from sd.weights import build
from train import judge, pretrain, toydata, toyloop


def test_toy_preset_shapes_and_size():
    assert preset("toy") is TOY and TOY.vae.factor == 4
    models = build(TOY)
    z = models.vae.encode(torch.zeros(1, 3, 64, 64)).mean
    assert z.shape == (1, 4, 16, 16)
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
        loss, logs = pretrain.vae_loss(vae, x, g, 1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and logs["kl"] > 0


def test_caption_dropout_means_the_empty_prompt():
    torch.manual_seed(0)
    model = pretrain.Denoiser(TOY)
    ids = pretrain.token_ids(["a photo of a red circle on a blue background"] * 2, TOY)
    empty = pretrain.token_ids([""], TOY)
    batch = {"mean": torch.randn(2, 4, 16, 16), "std": torch.zeros(2, 4, 16, 16), "ids": ids,
             "empty": empty, "ac": ddim.alphas_cumprod(TOY.schedule)}
    run = lambda b, drop: pretrain.diffusion_loss(  # noqa: E731
        model, b, torch.Generator().manual_seed(3), TOY, drop, 5.0)[0]
    with torch.no_grad():
        dropped = run(batch, 1.0)
        assert torch.equal(dropped, run({**batch, "ids": empty.expand(2, -1)}, 0.0))
        assert not torch.equal(dropped, run(batch, 0.0))


def test_loop_resumes_exactly(tmp_path):
    calls = []

    def loss_fn(model, g):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt  # killed between the checkpoint at step 6 and step 9
        x = torch.randn(8, 3, generator=g)
        return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean(), {}

    def train(folder):
        torch.manual_seed(0)
        sched = toyloop.Schedule(steps=9, lr=0.1, warmup=2, ema=0.9, every=3)
        return toyloop.run(folder, nn.Linear(3, 1), loss_fn, sched, seed=1, progress=False)

    crash_at = None
    straight = train(tmp_path / "a")
    calls.clear()
    crash_at = 8
    try:
        train(tmp_path / "b")
    except KeyboardInterrupt:
        pass
    resumed = train(tmp_path / "b")
    assert torch.equal(straight.weight, resumed.weight)
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 4  # header + steps 3, 6, 9


def test_judge_reads_labels_it_was_given():
    x, shapes, colours = judge.labelled(range(6), "test")
    assert x.shape == (6, 3, 64, 64)
    got_shapes, got_colours = judge.predict(judge.Judge(), x)
    assert len(got_shapes) == 6 and set(got_colours) <= set(judge.COLOURS)
    assert shapes.max() < len(judge.SHAPES) and colours.max() < len(judge.COLOURS)


def test_committed_judge_reads_held_out_scenes():
    # Held-out scenes beyond the 1,000 the judge was scored on when trained.
    x, shapes, colours = judge.labelled(range(2000, 2200), "test")
    shape_acc, colour_acc = judge.accuracy(judge.load("weights/toy/judge.safetensors"), x,
                                           shapes, colours)
    assert shape_acc >= 0.95 and colour_acc >= 0.95, (shape_acc, colour_acc)
