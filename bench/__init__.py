"""Benchmarks of our SD 2.1 modules and pipeline against diffusers/transformers (see BENCHMARKS.md).

    python -m bench.modules      # CPU: UNet, VAE decode, text encoder, ours vs reference
    python -m bench.generate     # GPU: 50-step text-to-image and the UNet alone, fp16
"""
