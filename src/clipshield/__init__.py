"""clipshield: attack, clean and harden CLIP models."""
__version__ = "0.1.0"
