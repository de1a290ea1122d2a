"""Optimisation on top of the frozen SD 2.1 model in sd/: inversion of real photos and
personalisation. Each module is one method with its own CLI (`python -m train.null_text ...`)."""
