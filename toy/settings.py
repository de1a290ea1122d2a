"""The toy world's settings that its command line shows (`python -m toy ... --help`) and its
library uses. Torch-free, so that toy/__main__.py can import it at its top and answer `--help`
and usage errors before torch loads; the library imports these from here."""

TWO = 0.25  # the share of two-subject scenes among the benchmark's sources (toy/swap.py source)
# make swap's default: the benchmark's median swap by photoswap's identity (toy/evaluate.py demo)
DEMO = ("dotted-star", 4)
# DreamBooth on the toy model, as DreamBoothSettings' fields (how it was chosen: weights/toy/
# README.md, "DreamBooth and the swap"; python -m bench.dreambooth_recipes compares others).
DREAMBOOTH = {"steps": 300, "lr": 1e-3, "batch_size": 4, "train_text_encoder": True, "seed": 0,
              "num_class_images": 50}  # with prior preservation: 50 images of "a photo of a CLASS"
# DreamBooth's acceptance in make eval-toy: this many backgrounds per concept, drawn from
# this seed (bench.dreambooth_recipes draws its own from another).
CONTEXTS, CONTEXT_SEED = 24, 4 * 10**9
