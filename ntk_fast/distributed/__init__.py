"""Grams beyond one process: an empirical NTK Gram computed tile by tile across torch.distributed ranks
into one memory-mapped ``.npy`` file, resumable after a kill (docs/distributed.md)."""
from ntk_fast.distributed.comm import DiskGramError
from ntk_fast.distributed.gram import gram_to_disk

__all__ = ["DiskGramError", "gram_to_disk"]
