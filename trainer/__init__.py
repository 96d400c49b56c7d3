"""Accelerate trainer for timm models on cxrbench shards: `trainer/run.py` (README, Training)."""
