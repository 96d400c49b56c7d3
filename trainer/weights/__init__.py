"""Pretrained weights for nodes without internet: fetch them into the caches on a login node,
verify offline that every one loads, before a sweep's trials start failing one by one.

    python -m trainer.weights fetch  --space sweeps/spaces/freeze_x_model.yaml   # login node
    python -m trainer.weights verify --space sweeps/spaces/freeze_x_model.yaml   # HF_HUB_OFFLINE=1

Modules: `needs` (which timm models a space or a set of configs loads pretrained), `sources`
(where timm's loader finds each one's weights; fetching them, finding them offline, loading them).
"""
