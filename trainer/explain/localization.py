"""Does a heatmap point at the lesion? Scores against ground-truth masks, and faithfulness.

- Pointing game (Zhang et al. 2016): a hit when the map's maximum lies inside the mask. A
  uniformly random point hits with probability equal to the mask's area fraction: that mean
  fraction is the random baseline reported beside it (`random_pointing`).
- Energy in mask: the share of the map's total mass inside the mask (the Score-CAM paper's
  "energy-based pointing game"); a uniform map scores the mask's area fraction too.
- Against radiologists' ground truth (`GroundTruthScore`, CheXlocalize's two metrics): the hit
  rate is the pointing game above; mIoU binarizes the map as CheXlocalize's
  heatmap_to_segmentation.py does (min-max normalised to 0-255 uint8, then Otsu's threshold, or a
  fixed threshold on the [0, 1] map) and averages the IoU over the "true positive slice"
  (CheXlocalize eval.py's default, true_pos_only=True): images whose ground truth and binarized
  map are both non-empty. A flat map binarizes to nothing: a miss, and no IoU (counted in n but
  not in n_iou).
- Deletion / insertion (Petsiuk et al. 2018, RISE): pixels are removed from the image (set to the
  normalised mean, 0), or added to a blurred copy, most salient first; the area under the
  model's probability curve. Low deletion and high insertion AUC mean the map names pixels the
  model really uses. No mask needed, so real data gets these too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def peak(heatmap: np.ndarray, tolerance: float = 1e-3) -> tuple[int, int] | None:
    """Where the map points: its maximum; None for a flat map (it points nowhere).

    An upsampled coarse map has a plateau at its maximum that reaches the image border (edge
    replication), and argmax would pick the plateau's first pixel, a corner. Ties within
    `tolerance` of the range are broken at the plateau pixel nearest the plateau's centroid.
    """
    high, low = float(heatmap.max()), float(heatmap.min())
    if not high > low:
        return None
    rows, cols = np.nonzero(heatmap >= high - tolerance * (high - low))
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's peak lies in the mask; a flat map is a miss."""
    point = peak(heatmap)
    return point is not None and bool(mask[point])


def energy_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the (non-negative) map's mass inside the mask; 0 for an all-zero map."""
    mass = np.clip(heatmap, 0.0, None)
    total = float(mass.sum())
    return float(mass[mask].sum()) / total if total > 0 else 0.0


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximizing the between-class variance of {≤ t} and
    {> t}, the first on ties (OpenCV's THRESH_OTSU, which CheXlocalize uses); 0 for one value."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = histogram / histogram.sum()
    q1 = np.cumsum(p)
    m1 = np.cumsum(p * np.arange(256))
    q2 = 1.0 - q1
    eps = np.finfo(np.float32).eps
    valid = (np.minimum(q1, q2) >= eps) & (np.maximum(q1, q2) <= 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m1[-1] * q1 - m1) ** 2 / (q1 * q2)
    between = np.where(valid, between, -1.0)
    return int(np.argmax(between)) if (between > 0).any() else 0


def binarize(heatmap: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The map as a segmentation: min-max normalised; `threshold` None → CheXlocalize's Otsu on the
    0-255 uint8 map (truncated, as np.uint8 does), else pixels above `threshold` in [0, 1]."""
    low, high = float(heatmap.min()), float(heatmap.max())
    if not high > low:
        return np.zeros(heatmap.shape, dtype=bool)
    normalised = (heatmap.astype(np.float64) - low) / (high - low)
    if threshold is not None:
        return normalised > threshold
    levels = (255 * normalised).astype(np.uint8)
    return levels > otsu_threshold(levels)


def iou(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """Intersection over union; None where either is empty (outside the true positive slice)."""
    if not prediction.any() or not truth.any():
        return None
    return float((prediction & truth).sum()) / float((prediction | truth).sum())


@dataclass
class GroundTruthScore:
    """One (model, method, label) cell against radiologists' ground truth."""

    hits: int = 0
    n: int = 0
    area: float = 0.0
    iou: float = 0.0
    n_iou: int = 0

    def add(self, heatmap: np.ndarray, truth: np.ndarray, threshold: float | None = None) -> None:
        self.hits += pointing_hit(heatmap, truth)
        self.area += float(truth.mean())
        self.n += 1
        overlap = iou(binarize(heatmap, threshold), truth)
        if overlap is not None:
            self.iou += overlap
            self.n_iou += 1

    def merge(self, other: GroundTruthScore) -> None:
        self.hits += other.hits
        self.n += other.n
        self.area += other.area
        self.iou += other.iou
        self.n_iou += other.n_iou

    def as_dict(self) -> dict:
        """hit_rate (pointing game) beside random_point, the hit rate a uniformly random point
        expects: the mean area share of the ground truth (also the IoU of marking the whole image)."""
        def mean(total: float, count: int) -> float | None:
            return round(total / count, 4) if count else None

        return {"hit_rate": mean(self.hits, self.n), "random_point": mean(self.area, self.n),
                "miou": mean(self.iou, self.n_iou), "n": self.n, "n_iou": self.n_iou}


@dataclass
class Score:
    """Accumulates one (model, method, label) cell of the table."""

    hits: int = 0
    energy: float = 0.0
    area: float = 0.0
    n: int = 0
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)

    def add_localization(self, heatmap: np.ndarray, mask: np.ndarray) -> None:
        self.hits += pointing_hit(heatmap, mask)
        self.energy += energy_in_mask(heatmap, mask)
        self.area += float(mask.mean())
        self.n += 1

    def merge(self, other: Score) -> None:
        self.hits += other.hits
        self.energy += other.energy
        self.area += other.area
        self.n += other.n
        self.deletion += other.deletion
        self.insertion += other.insertion

    def as_dict(self) -> dict:
        def mean(total: float, count: int) -> float | None:
            return round(total / count, 4) if count else None

        return {
            "pointing_game": mean(self.hits, self.n),
            "energy_in_mask": mean(self.energy, self.n),
            "random_pointing": mean(self.area, self.n),
            "n": self.n,
            "deletion_auc": mean(sum(self.deletion), len(self.deletion)),
            "insertion_auc": mean(sum(self.insertion), len(self.insertion)),
            "n_faithfulness": len(self.deletion),
        }


def _blurred(images: torch.Tensor) -> torch.Tensor:
    """A heavily blurred copy (1/8 resolution, upsampled): insertion's starting canvas."""
    height, width = images.shape[-2:]
    small = F.adaptive_avg_pool2d(images, (max(1, height // 8), max(1, width // 8)))
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def deletion_insertion(model: nn.Module, images: torch.Tensor, heatmaps: np.ndarray, index: int,
                       steps: int, batch_size: int = 64) -> tuple[list[float], list[float]]:
    """Per image: (deletion AUC, insertion AUC) of P(label `index`) over `steps` equal pixel steps."""
    count, _, height, width = images.shape
    pixels = height * width
    order = torch.from_numpy(np.argsort(-heatmaps.reshape(count, -1), axis=1, kind="stable"))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels).expand(count, pixels).contiguous())
    rank = rank.view(count, 1, height, width).to(images.device)
    fractions = torch.linspace(0, 1, steps + 1, device=images.device)
    blurred = _blurred(images)
    variants = []
    for fraction in fractions:  # (steps + 1) × count images per curve
        salient = rank < torch.round(fraction * pixels)
        variants.append((torch.where(salient, torch.zeros_like(images), images),
                         torch.where(salient, images, blurred)))
    deleted = torch.cat([d for d, _ in variants])
    inserted = torch.cat([i for _, i in variants])
    curves = []
    with torch.no_grad():
        for batch in (deleted, inserted):
            logits = torch.cat([model(chunk) for chunk in batch.split(batch_size)])
            probs = torch.sigmoid(logits[:, index].float()).view(steps + 1, count).T.cpu().numpy()
            curves.append(np.trapezoid(probs, dx=1.0 / steps, axis=1))
    return [float(v) for v in curves[0]], [float(v) for v in curves[1]]
