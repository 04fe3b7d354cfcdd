"""rlalign: online reward alignment of text-to-image diffusion models on Ray.

This module holds the version only; it imports nothing heavy (no ray, diffusers, peft), so that
`import rlalign` and `rlalign --help` stay fast.
"""

__version__ = "0.1.0"
