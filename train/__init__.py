"""The trainers on top of the SD model in sd/: DreamBooth and textual inversion (train/settings.py
holds their settings; `python -m train dreambooth|textual-inversion` is their command line), the
loop they share (train/loop.py), their images (train/dataset.py) and checkpoints."""

from sd.errors import UsageError  # noqa: F401 (bad input: one `error:` line, exit code 2)
