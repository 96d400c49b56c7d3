"""The explain job: heatmaps for trained runs, and whether they point at the lesion.

`python -m trainer.explain --run RUN [RUN ...] --shards DIR --split test --out OUT` loads each run's
`best/` export (safe tensor files only), picks samples (the most confident true positives per
label plus random ones), computes Grad-CAM / Grad-CAM++ (pytorch-grad-cam) and attention rollout
(ViT family) for each label, scores them against the synthetic generator's per-label lesion
masks (pointing game, energy in mask, deletion/insertion AUC) and writes overlays, one grid per
label, an HTML gallery, TensorBoard images and `localization.json`.

Modules: `loading` (run → model), `cam_layers` (which layer, which reshape, per architecture
family), `rollout`, `methods` (the registry of explainers), `samples` (streams and selection),
`localization` (scores), `gallery` (images, HTML, TensorBoard), `job` (the whole run).
"""

DEFAULT_METHODS: tuple[str, ...] = ("gradcam", "gradcam++", "rollout")
"""Here, not in `methods`, so `--help` answers without importing torch."""
