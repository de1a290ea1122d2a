"""DreamBooth and textual inversion on the tiny preset: learning, checkpoints, resume, DDP."""

import socket
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sd.cli import run as run_cli
from sd.config import TINY
from sd.pipeline import Pipeline
from sd.weights import load
from train import UsageError, dreambooth, textual_inversion
from train import __main__ as train_cli
from train.checkpoints import find as find_checkpoint
from train.checkpoints import load_modules
from train.dataset import ImageFolder, draw, examples
from train.loop import Denoiser, Run, denoising_loss, load_pipeline
from train.settings import DreamBoothSettings, TextualInversionSettings

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores, maybe shared: oversubscribed threads make tiny models 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def red_squares(folder: Path, n: int = 4, side: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (side, side), (30 * i, 60, 200))
        ImageDraw.Draw(image).rectangle([8 + 4 * i, 12, 40 + 4 * i, 44], fill=(255, 0, 0))
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    return red_squares(tmp_path_factory.mktemp("instances"))


def db_args(instances: Path, out: Path, **extra) -> DreamBoothSettings:
    """DreamBooth's settings built in Python: no command line involved."""
    return DreamBoothSettings(instance_dir=instances, instance_prompt="a photo of sks square",
                              model="tiny", lr=1e-4, out=out, quiet=True, **extra)


@pytest.fixture(scope="module")
def trained(instances, tmp_path_factory):
    """50 DreamBooth steps at batch 2 on 4 fixed images (centre crops)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("db")
    args = db_args(instances, out, steps=50, batch_size=2, center_crop=True, checkpoint_every=0)
    return dreambooth.train(args), out


# ------------------------------------------------------------------------------------ data

def test_image_folder_skips_and_reports(tmp_path):
    (tmp_path / "a.doc").write_text("not an image")
    Image.new("RGB", (80, 64), "red").save(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").write_bytes((tmp_path / "b.jpg").read_bytes()[:300])  # truncated
    Image.new("RGB", (48, 40), "blue").save(tmp_path / "c.png")  # smaller than 64
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.new("RGB", (128, 64), "green").save(tmp_path / "d.jpg", exif=exif)
    folder = ImageFolder(tmp_path, 64)
    print(*folder.warnings, sep="\n")
    assert folder.names == ["c.png", "d.jpg"]
    assert "skipped 2 of 4 files: a.doc (not an image), b.jpg (truncated)" in folder.warnings[0]
    assert "c.png (48x40)" in folder.warnings[1] and "upscaled" in folder.warnings[1]
    assert folder.images[0].shape == (3, 64, 77)  # shorter side to 64, aspect kept
    assert folder.images[1].shape == (3, 128, 64)  # EXIF orientation applied: now portrait
    crops = folder.batch([0, 1], torch.rand(2, 3), 64, center_crop=False, flip=True)
    assert crops.shape == (2, 3, 64, 64) and -1 <= crops.min() and crops.max() <= 1

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty"):
        ImageFolder(empty, 64)
    (empty / "x.doc").write_text("no")
    with pytest.raises(UsageError, match="x.doc \\(not an image\\)"):
        ImageFolder(empty, 64)
    (empty / "x.doc").unlink()
    (empty / "x.txt").write_text("a caption")
    with pytest.raises(UsageError, match="no images, only captions"):
        ImageFolder(empty, 64)


def test_image_folder_reads_each_images_caption(tmp_path):
    """NAME.txt beside NAME.png is that image's caption; none, or a blank one, is None."""
    red_squares(tmp_path, n=3)
    (tmp_path / "0.txt").write_text("  a photo of sks square on grass\n")
    (tmp_path / "2.txt").write_text("\n")
    folder = ImageFolder(tmp_path, 64)
    assert folder.warnings == []  # a caption is not a skipped file
    assert folder.captions == ["a photo of sks square on grass", None, None]
    (tmp_path / "1.txt").write_bytes(b"a photo of \xff")
    with pytest.raises(UsageError, match="1.txt: not a readable UTF-8 caption"):
        ImageFolder(tmp_path, 64)


def test_two_ranks_split_the_global_batch_of_one():
    """rank r of 2 with batch b draws exactly examples r::2 of 1 process with batch 2b."""
    latent = (4, 8, 8)
    one = draw(torch.Generator().manual_seed(1), 3, 4, Run(), 2, latent, 1000)
    for r in range(2):
        mine = draw(torch.Generator().manual_seed(1), 3, 2, Run(r, 2), 2, latent, 1000)
        assert torch.equal(mine.positions, one.positions[r::2])
        assert torch.equal(mine.u, one.u[:, r::2])
        rows = torch.arange(8).view(2, 4)[:, r::2].flatten()  # [instance x 2, class x 2]
        assert torch.equal(mine.t, one.t[rows]) and torch.equal(mine.noise, one.noise[rows])


# ------------------------------------------------------------------------------------ DreamBooth

def test_dreambooth_loss_decreases(trained):
    result, _ = trained
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    print(f"mean loss of steps 1-10: {first:.4f}, of steps 41-50: {last:.4f}")
    assert last < 0.8 * first


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_dreambooth_trains_each_image_with_its_caption(tmp_path, monkeypatch, train_text_encoder):
    """Instance rows carry their image's NAME.txt (else --instance-prompt); class images are
    drawn from the class prompts in turn, each saved with its prompt, and trained with it."""
    instances = red_squares(tmp_path / "instances", n=3)
    own = {"0.png": "a photo of sks square on grass", "2.png": "a photo of sks square at night"}
    for name, text in own.items():
        (instances / name).with_suffix(".txt").write_text(text)
    classes = ["a photo of a red square", "a photo of a blue square"]
    seen = []
    real = dreambooth.denoising_loss

    def spy(model, vae, cfg, ac, images, text, d):
        seen.append(text.detach().clone())
        return real(model, vae, cfg, ac, images, text, d)

    monkeypatch.setattr(dreambooth, "denoising_loss", spy)
    args = db_args(instances, tmp_path / "db", steps=4, batch_size=2, checkpoint_every=0,
                   train_text_encoder=train_text_encoder, class_prompt=classes,
                   class_dir=tmp_path / "class", num_class_images=2)
    pipe = dreambooth.train(args).pipe
    assert [(tmp_path / "class" / f"class-0000{k}.txt").read_text() for k in range(2)] == \
        [f"{c}\n" for c in classes]
    # what each row must be: the prompt's ids, or (frozen encoder) its embedding, which the
    # trained model's encoder still gives as it was not trained
    instance = [*own.values(), args.instance_prompt]
    code = (lambda p: pipe.tokenizer([p])[0]) if train_text_encoder else \
        (lambda p: pipe.models.text_encoder(pipe.tokenizer([p]))[0])
    with torch.no_grad():
        want = {p: code(p) for p in instance + classes}

    def which(row: torch.Tensor) -> str:
        found = [p for p, w in want.items() if torch.allclose(row, w, rtol=0, atol=1e-6)]
        assert len(found) == 1, "a row is no one prompt's text"
        return found[0]

    rows = [[which(r) for r in text] for text in seen]
    assert len(rows) == 4 and all(len(r) == 4 for r in rows)
    assert {p for r in rows for p in r[:2]} == set(instance)  # 8 draws of 3 images: all seen
    assert {p for r in rows for p in r[2:]} == set(classes)


def test_checkpoint_loads_in_diffusers_and_ours(trained):
    from diffusers import UNet2DConditionModel

    result, out = trained
    ours = load(out / "model", TINY)
    theirs = UNet2DConditionModel.from_pretrained(out / "model" / "unet").eval()
    for name, p in result.pipe.models.unet.state_dict().items():
        assert torch.equal(p, ours.unet.state_dict()[name]), name
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        a = ours.unet(x, t, context)
        b = theirs(x, t, encoder_hidden_states=context).sample
    print(f"UNet ours vs diffusers from out/model: max abs diff {(a - b).abs().max():.2e}")
    assert (a - b).abs().max() < 1e-5
    assert (out / "model" / "MODEL").read_text().count("preset=tiny") == 1


def test_killed_save_keeps_the_previous_checkpoint_and_resume_is_exact(instances, tmp_path,
                                                                        monkeypatch):
    extra = dict(steps=6, checkpoint_every=3, batch_size=1, grad_accum=2, warmup_steps=2,
                 flip=True, train_text_encoder=True)
    whole = dreambooth.train(db_args(instances, tmp_path / "whole", **extra))

    out = tmp_path / "killed"
    real_save = torch.save

    killed_in = []

    def dies_saving_checkpoint_6(obj, f, *a, **k):
        if "checkpoint-6" in str(f):  # unet/ and text_encoder/ are already written
            killed_in.append(Path(f).parent)
            assert (Path(f).parent / "unet").is_dir() and Path(f).parent.name.endswith(".tmp")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_saving_checkpoint_6)
    with pytest.raises(KeyboardInterrupt):
        dreambooth.train(db_args(instances, out, **extra))
    monkeypatch.undo()
    # the save died with unet/ written in checkpoint-6.tmp/; the half-written folder is removed
    assert killed_in == [out / "checkpoint-6.tmp"] and not (out / "checkpoint-6").exists()
    assert not (out / "checkpoint-6.tmp").exists()
    folder = find_checkpoint(out, "latest")
    assert folder.name == "checkpoint-3"
    state = torch.load(folder / "state.pt", weights_only=True)
    assert state["step"] == 3
    fresh = load_pipeline("tiny", None, torch.device("cpu"), 0)
    load_modules(folder, unet=fresh.models.unet, text_encoder=fresh.models.text_encoder)

    resumed = dreambooth.train(db_args(instances, out, **extra, resume="latest"))
    assert resumed.losses == whole.losses[3:]
    for name in ("unet", "text_encoder"):
        a = getattr(whole.pipe.models, name).state_dict()
        b = getattr(resumed.pipe.models, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resuming"
    print(f"resumed run == uninterrupted run, bit for bit; losses {resumed.losses}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, s: DreamBoothSettings, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    m = dreambooth.train(s).pipe.models
    torch.save({"unet": m.unet.state_dict(), "text_encoder": m.text_encoder.state_dict()},
               f"{out}/rank{rank}.pt")


def test_two_process_ddp_matches_one_process(instances, tmp_path):
    """gloo on CPU; 2 ranks x batch 1 vs 1 process x batch 2, prior preservation, text encoder."""
    import torch.multiprocessing as mp

    common = dict(steps=2, train_text_encoder=True, class_prompt="a photo of a square",
                  class_dir=tmp_path / "class", num_class_images=2, checkpoint_every=0)
    red_squares(tmp_path / "class", n=1)  # one class image cached already: generate only one
    s = db_args(instances, tmp_path / "ddp", batch_size=1, **common)
    mp.spawn(_ddp_worker, (2, _free_port(), s, str(tmp_path)), nprocs=2)
    assert [f.name for f in sorted((tmp_path / "class").iterdir())] == ["0.png", "class-00000.png",
                                                                      "class-00000.txt"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = dreambooth.train(db_args(instances, tmp_path / "one", batch_size=2,
                                      **common)).pipe.models
    # Adam divides by sqrt(v): an element whose gradient is ~0 (summation-order noise) moves by up
    # to +-lr either way, so the max abs diff is not a tolerance; the size of the difference
    # relative to the whole update is.
    init = load_pipeline("tiny", None, torch.device("cpu"), 0).models
    for part in ("unet", "text_encoder"):
        one, start = getattr(single, part).state_dict(), getattr(init, part).state_dict()
        assert all(torch.equal(ranks[0][part][k], ranks[1][part][k]) for k in one)
        diff = torch.cat([(ranks[0][part][k] - v).flatten() for k, v in one.items()])
        update = torch.cat([(v - start[k]).flatten() for k, v in one.items()])
        rel = (diff.norm() / update.norm()).item()
        print(f"{part}: rank 0 == rank 1 exactly; vs 1 process: max abs diff "
              f"{diff.abs().max():.2e} (lr 1e-4), {(diff.abs() > 1e-6).sum()} of {diff.numel()} "
              f"elements differ by > 1e-6, |diff| / |update| = {rel:.1e}")
        assert rel < 1e-3


# ------------------------------------------------------------------------- textual inversion

def fixed_loss(pipe: Pipeline, prompt: str, instances: Path, n: int = 64) -> float:
    """The denoising loss on n fixed draws: a paired before/after comparison, unlike the
    training losses, whose random timesteps swamp what one embedding vector can change."""
    d = draw(torch.Generator().manual_seed(123), 0, n, Run(), 1, (4, 8, 8), 1000)
    folder = ImageFolder(instances, 64)
    x = folder.batch(examples(len(folder), 0, d.positions), d.u[0], 64, True, False)
    model = Denoiser(pipe.models.unet, pipe.models.text_encoder)
    with torch.no_grad():
        ids = pipe.tokenizer([prompt] * n)
        return denoising_loss(model, pipe.models.vae, pipe.cfg, pipe.ac, x, ids, d).mean().item()


def test_textual_inversion_learns_only_the_new_row(instances, tmp_path):
    before = load_pipeline("tiny", None, torch.device("cpu"), 0)
    table = "embeddings.token_embedding.weight"
    square = before.tokenizer.encode("square")[0]
    a = {k: v.clone() for k, v in before.models.text_encoder.state_dict().items()}
    before.add_concepts({"<sks-square>": a[table][square]})
    args = TextualInversionSettings(instance_dir=instances, token="<sks-square>",
                                    init_word="square", model="tiny", lr=5e-2, steps=30,
                                    batch_size=2, center_crop=True, out=tmp_path, quiet=True,
                                    checkpoint_every=0)
    result = textual_inversion.train(args)
    prompt = "a photo of a <sks-square>"
    start, end = fixed_loss(before, prompt, instances), fixed_loss(result.pipe, prompt, instances)
    print(f"textual inversion: loss on 64 fixed draws {start:.5f} -> {end:.5f}; training loss "
          f"steps 1-10 {sum(result.losses[:10]) / 10:.4f}, 21-30 "
          f"{sum(result.losses[-10:]) / 10:.4f}")
    assert end < start

    after = result.pipe.models
    for name in ("unet", "vae"):
        old, new = getattr(before.models, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(old[k], new[k]) for k in old), name
    b = after.text_encoder.state_dict()
    assert b[table].shape[0] == a[table].shape[0] + 1
    assert torch.equal(b[table][:-1], a[table])  # every old row, bitwise
    assert all(torch.equal(a[k], b[k]) for k in a if k != table)
    assert not torch.equal(b[table][-1], a[table][square])  # the new row moved from its init

    pipe = Pipeline(load_pipeline("tiny", None, torch.device("cpu"), 0).models, TINY)
    pipe.add_concepts(tmp_path / "learned_embeds.safetensors")
    assert torch.equal(pipe.models.text_encoder.state_dict()[table], b[table])


# ------------------------------------------------------------------------------------ CLIs

def test_help_and_clear_errors(instances, tmp_path, capsys):
    for command in ("dreambooth", "textual-inversion"):
        with pytest.raises(SystemExit):
            train_cli.main([command, "--help"])
        assert "examples:" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    db = ["dreambooth", "--instance-prompt", "x"]
    assert run_cli(train_cli.main, [*db, str(empty), "--model", "tiny"]) == 2
    assert f"{empty}: the folder is empty" in capsys.readouterr().err
    assert run_cli(train_cli.main, [*db, str(instances), "--model", "sd2.1", "--weights",
                                    str(tmp_path / "nothing")]) == 2
    assert "make weights MODEL=sd2.1" in capsys.readouterr().err
    ti = ["textual-inversion", str(instances), "--token", "dog", "--model", "tiny"]
    assert run_cli(train_cli.main, ti) == 2
    assert '"<my-dog>"' in capsys.readouterr().err
    with pytest.raises(UsageError, match="--steps: give 1 or more"):  # Python callers too
        dreambooth.train(db_args(instances, tmp_path / "x", steps=0))
    many = train_cli.dreambooth_parser().parse_args(
        [str(instances), "--instance-prompt", "x", "--class-prompt", "a", "--class-prompt", "b"])
    assert DreamBoothSettings.of(many).class_prompts == ["a", "b"]  # repeated: used in turn
    with pytest.raises(UsageError, match="--class-prompt: give a prompt, not an empty one"):
        db_args(instances, tmp_path / "x", class_prompt=["a", " "], class_dir=tmp_path).check()
