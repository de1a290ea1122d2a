"""The recipes' settings and their presets, torch-free: the command line (recipes/__main__.py)
lists and reads them before torch loads; the libraries (correspondence.py, cds.py) take them.

Each recipe has a frozen Settings dataclass, its PRESETS (the first is the default) and HELP,
the words --help gives for each field (the command line adds every preset's value).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class CorrespondenceSettings:
    """recipes/correspondence.py's settings (Hedlin et al. 2023); the defaults are `paper`."""

    lr: float = 0.0023755632081200314
    steps: int = 129
    inits: int = 5
    schedule: int = 50
    noise_index: int = -8
    sigma: float = 27.97853316316864 / 512
    crop: float = 0.9316549294381423
    crops: int = 20
    layers: int = 4


CORRESPONDENCE_PRESETS = {"paper": CorrespondenceSettings(),
                          "toy": CorrespondenceSettings(lr=0.1, steps=40, inits=2, crops=8)}
CORRESPONDENCE_HELP = {
    "lr": "Adam learning rate of the embedding",
    "steps": "optimisation steps per initialisation",
    "inits": "random initial embeddings; their target maps are averaged",
    "schedule": "DDIM steps of the schedule the timestep is taken from",
    "noise_index": "which of its timesteps noises the image (-8 of 50: t = 141)",
    "sigma": "the Gaussian's std, as a fraction of the image side",
    "crop": "random crop side, as a fraction of the image side",
    "crops": "crops averaged on the target (the first four at the corners)",
    "layers": "decoder cross layers read: the first ones at the two coarsest levels",
}


@dataclass(frozen=True)
class CDSSettings:
    """recipes/cds.py's settings: the CDS authors' (Nam et al. 2024)."""

    iterations: int = 200
    lr: float = 0.1
    guidance: float = 7.5
    t_min: int = 50
    t_max: int = 950
    w_dds: float = 1.0
    w_cut: float = 3.0
    patches: int = 256
    patch_sizes: tuple[int, ...] = (1, 2)
    temperature: float = 0.07
    scale: float = 2000 / 64**2


CDS_PRESETS = {"paper": CDSSettings()}  # the toy model takes them as they are
CDS_HELP = {
    "iterations": "optimisation steps on the target latent",
    "lr": "SGD learning rate",
    "guidance": "classifier-free guidance scale of both noise predictions",
    "t_min": "t is drawn uniformly from [t-min, t-max) (DDS avoids the extremes)",
    "t_max": "see --t-min",
    "w_dds": "weight of the DDS gradient",
    "w_cut": "weight of the contrastive (CUT) loss; 0 gives DDS alone",
    "patches": "patch positions sampled per layer and patch size",
    "patch_sizes": "patch sides in feature pixels (average-pooled)",
    "temperature": "of the PatchNCE softmax",
    "scale": "the DDS gradient per latent element is scale * w_dds * delta (theirs: 2000/64^2)",
}
