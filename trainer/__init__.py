"""Accelerate trainer for timm models on cxrbench shards (see the trainer issue)."""
