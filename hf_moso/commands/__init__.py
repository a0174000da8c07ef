"""The `hf-moso` command line: `score`, `prune`, `card` and `push` on the output folder of `MoSoTrainer`."""

from .main import main


__all__ = ["main"]
