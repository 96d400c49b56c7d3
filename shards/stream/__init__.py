"""The reading half of `shards`: packed tar shards → batches on the device, exact across ranks.

In the order a sample travels: `tarread` (tar → raw samples) → `decode` (image bytes → pixels) →
`augment` (one affine warp + brightness/contrast) → `label_policy` (raw labels → targets and
mask) → `wire` (a batch across the worker boundary in one buffer) → `staging` (onto the device
ahead of the step) → `loader` (the streams themselves). Reads what `shards.pack` wrote.
"""

from shards.stream.augment import AugmentConfig
from shards.stream.label_policy import LabelPolicy
from shards.stream.loader import IMAGENET_GRAY, Stream, StreamConfig, eval_stream, train_stream

__all__ = ["IMAGENET_GRAY", "AugmentConfig", "LabelPolicy", "Stream", "StreamConfig", "eval_stream",
           "train_stream"]
