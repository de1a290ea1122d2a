"""The errors that mean "what you gave is wrong": a command prints them as one `error:` line
and exits with code 2 (sd/cli.py). Here, not in the CLI layer, because the library raises them
(sd/weights.py, sd/ldm.py, the trainers) and the library must not import its command lines.
"""


class UsageError(ValueError):
    """Bad input from the command line or the files it names: one `error:` line, exit code 2."""


class WeightsError(UsageError):
    """A weights file is missing, unreadable, or does not fit the model (sd/weights.py, sd/ldm.py
    raise it)."""


class MissingWeights(WeightsError):
    """No weights where a preset's are looked for; the CLI layer (sd/cli.py `advice`) says how
    to get them."""

    def __init__(self, message: str, preset: str):
        super().__init__(message)
        self.preset = preset
