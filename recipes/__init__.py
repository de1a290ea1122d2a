"""Research built on the `sd` attention interface, one library file per method.

- heat maps (DAAM, Tang et al. 2023): `sd.controls.HeatMap` and `python -m sd --heatmap` (one
  implementation, in sd, because the text-to-image CLI uses it too); `recipes/heatmap.py` reads
  it for a given image and scores it on the toy world;
- `recipes/correspondence.py`: unsupervised semantic correspondence (Hedlin et al., NeurIPS
  2023);
- `recipes/cds.py`: Delta and Contrastive Denoising Score editing (Hertz et al. 2023; Nam et al.,
  CVPR 2024);
- `recipes/settings.py`: their settings and presets, torch-free;
- `recipes/__main__.py`: the command line, one command per method (it loads a library, and
  torch, only to run a command, so --help answers at once):

      python -m recipes heatmap --toy 50 --weights weights/toy
      python -m recipes correspondence SOURCE TARGET --point X Y   (or --toy PAIRS)
      python -m recipes cds IMAGE --source PROMPT --target PROMPT  (or --toy SCENES)

`toy.heldout` is the toy world as their benchmark (scenes, keypoints, pairs).
"""
