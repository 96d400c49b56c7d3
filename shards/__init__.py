"""Chest X-ray datasets → WebDataset shards → streams: the data half of cxrbench."""

__version__ = "0.1.0"
