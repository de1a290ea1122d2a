"""Photoswap (Gu et al. 2023) on sd's attention interface; see README.md and control.py."""
