"""Optimisation on top of the frozen SD 2.1 model in sd/: inversion of real photos and
personalisation. Each method has its own CLI (`python -m train.null_text ...`)."""


from sd.cli import UsageError  # noqa: F401 (bad input: one `error:` line, exit code 2)
