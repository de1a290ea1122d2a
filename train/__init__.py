"""Optimisation on top of the frozen SD 2.1 model in sd/: inversion of real photos and
personalisation. Each method has its own CLI (`python -m train.null_text ...`)."""


class UsageError(ValueError):
    """Bad input from the command line or its files: the CLIs print it as one `error:` line."""
