"""The toy world: procedurally drawn scenes with exact subject masks, the small SD 2.1-shaped model
trained on them, and Photoswap measured on it. `scenes` draws, `concepts` holds the DreamBooth
subjects, `data` caches training pools, `judge` reads shapes and colours, `pretrain` trains the
model (`make toy`), `metrics` scores a swap against the exact render, `swap` is `make swap`,
`evaluate` the benchmark (`make eval-toy`), `heldout` the recipes' held-out sets.

`python -m toy COMMAND` (toy/__main__.py) is the package's one command line: pretrain, swap,
evaluate, identity, judge; `settings` holds what it shows before torch loads."""
