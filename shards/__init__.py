"""Chest X-ray datasets → WebDataset shards → streams: the data half of cxrbench.

Two halves that meet only in the files on disk: `shards.pack` writes a pack (tar shards and
manifest.json), `shards.stream` reads it back as batches. The modules at this level are what
both need: `manifest` (the pack's format), `labels`, `lesion` (mask format), `hashing`, `atomic`,
`errors`. `shards.synth` makes synthetic source trees to pack; `shards.demo` runs all three.
"""

__version__ = "0.1.0"
