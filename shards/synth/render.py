"""Draw radiograph-like chest images whose findings follow their labels, with lesion masks.

Pure numpy (no torch, no scipy): generation runs in forked workers and must be fast, thousands
of images a minute on one core. Geometry lives in normalised coordinates (the shorter image side
spans [-1, 1]), so the same anatomy draws at any size and aspect ratio. Each finding is a
painter that adds intensity (and, at full strength, marks its pixels in the mask with its label's
bit, so the mask tells findings apart: `shards.lesion`); a model can
only learn a label from what its painter draws, which is what makes "the model learned" a real
assertion in the trainer's tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

Window = tuple[slice, slice]


class Canvas:
    """An image being drawn (float32, ~[0, 1]) and its lesion mask (uint16 label bits).

    Marked pixels get `bit`, the label of the finding being drawn (set by `labelled`).
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.scale = min(height, width) / 2
        self.u = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / self.scale)[None, :]
        self.v = ((np.arange(height, dtype=np.float32) + 0.5 - height / 2) / self.scale)[:, None]
        self.image = np.zeros((height, width), np.float32)
        self.mask = np.zeros((height, width), np.uint16)
        self.bit = 1

    def window(self, cx: float, cy: float, rx: float, ry: float) -> Window:
        """Pixel slices covering the box centre ± radius (clipped to the image)."""
        x0 = max(0, math.floor((cx - rx) * self.scale + self.width / 2))
        x1 = min(self.width, math.ceil((cx + rx) * self.scale + self.width / 2) + 1)
        y0 = max(0, math.floor((cy - ry) * self.scale + self.height / 2))
        y1 = min(self.height, math.ceil((cy + ry) * self.scale + self.height / 2) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def coords(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        return self.u[:, win[1]], self.v[win[0], :]

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0,
                edge: float = 0.1, win: Window | None = None) -> tuple[Window, np.ndarray]:
        """Soft-edged ellipse weights in [0, 1], evaluated only inside its bounding box (or `win`)."""
        if win is None:
            reach = max(rx, ry) * (1 + 5 * edge)
            win = self.window(cx, cy, reach, reach)
        u, v = self.coords(win)
        du, dv = u - cx, v - cy
        if angle:
            cos, sin = math.cos(angle), math.sin(angle)
            du, dv = cos * du + sin * dv, cos * dv - sin * du
        radius = np.sqrt((du / rx) ** 2 + (dv / ry) ** 2)
        return win, _sigmoid((1 - radius) / edge)

    def add(self, win: Window, weight: np.ndarray, amount: float, mark: bool = False) -> None:
        """Add `amount × weight`; with `mark`, pixels where the weight exceeds ½ join the mask."""
        self.image[win] += amount * weight
        if mark:
            self.mark(win, weight > 0.5)

    def mark(self, win: Window, where: np.ndarray) -> None:
        """Set the current finding's bit where `where` is true inside `win`."""
        region = self.mask[win]  # a view: the update lands in the mask
        region[where] |= np.uint16(self.bit)

    @property
    def full(self) -> Window:
        return slice(0, self.height), slice(0, self.width)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


@dataclass
class Lung:
    cx: float
    cy: float
    rx: float
    ry: float
    weight: np.ndarray = field(repr=False)
    """Soft lung-field weights over the whole canvas: confines opacities to the lung."""

    @property
    def lateral_sign(self) -> float:
        """+1 if the lung's outer wall is towards +u (image right), −1 otherwise."""
        return 1.0 if self.cx >= 0 else -1.0


@dataclass
class Anatomy:
    lungs: list[Lung]
    heart: tuple[float, float, float, float]
    mediastinum_x: float
    scale: float
    lateral: bool


def draw_anatomy(canvas: Canvas, rng: np.random.Generator, lateral: bool) -> Anatomy:
    """Body, spine/mediastinum, lungs with ribs, heart and clavicles, with per-patient jitter."""
    k = rng.uniform(0.88, 1.04)
    dx, dy = rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)
    canvas.image += rng.uniform(0.03, 0.08)
    canvas.add(*canvas.ellipse(dx, 0.15 + dy, 0.98 * k, 1.45 * k, edge=0.04), rng.uniform(0.36, 0.44))
    u, v = canvas.u, canvas.v
    if lateral:
        spine_x = 0.62 * k + dx
        canvas.image += 0.22 * _sigmoid((0.08 * k - np.abs(u - spine_x)) / 0.02) * _sigmoid((0.9 - v) / 0.05)
        shapes = [(0.05 * k + dx, -0.02 + dy, 0.5 * k, 0.62 * k)]
        heart = (-0.22 * k + dx, 0.3 * k + dy, 0.26 * k, 0.22 * k)
        mediastinum_x = -0.1 * k + dx
    else:
        mediastinum_x = dx
        canvas.image += 0.16 * _sigmoid((0.08 * k - np.abs(u - dx)) / 0.02) * _sigmoid((1.0 - v) / 0.05)
        shapes = [(side * 0.37 * k + dx, -0.05 + dy, 0.29 * k, 0.62 * k) for side in (-1, 1)]
        heart = (0.1 * k + dx, 0.3 * k + dy, 0.27 * k, 0.21 * k)
    lungs = []
    for cx, cy, rx, ry in shapes:
        du, dv = (u - cx) / rx, (v - cy) / ry
        weight = _sigmoid((1 - np.sqrt(du * du + dv * dv)) / 0.06)
        lungs.append(Lung(cx, cy, rx, ry, weight))
        canvas.image -= rng.uniform(0.25, 0.3) * weight
        # Ribs: curved bands across the lung field, brighter where bone overlaps air.
        phase = (v - 0.35 * (u - cx) ** 2 / k) * rng.uniform(5.2, 6.2) / k + rng.uniform(0, 1)
        bands = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 4
        canvas.image += rng.uniform(0.06, 0.09) * bands * weight
    canvas.add(*canvas.ellipse(*heart, edge=0.08), rng.uniform(0.17, 0.22))
    if not lateral:
        for side in (-1, 1):
            win, weight = canvas.ellipse(side * 0.3 * k + dx, -0.78 * k + dy, 0.3 * k, 0.035 * k,
                                         angle=side * 0.25, edge=0.15)
            canvas.add(win, weight, 0.12)
    return Anatomy(lungs, heart, mediastinum_x, k, lateral)


def finish(canvas: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Exposure, gamma and quantum noise; returns uint8 H×W."""
    image = canvas.image * rng.uniform(0.92, 1.08) + rng.uniform(-0.03, 0.03)
    image += rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(0.01, 0.025)
    np.clip(image, 0.0, 1.0, out=image)
    image **= rng.uniform(0.85, 1.15)
    return (image * 255.0 + 0.5).astype(np.uint8)


# --- Findings -----------------------------------------------------------------------------------
# Each painter draws one observation at `strength` (1 = certain, lower = equivocal) and marks its
# pixels in the mask only at full strength (an uncertain finding has no ground-truth extent).

Painter = Callable[[Canvas, Anatomy, np.random.Generator, float], None]


def _point_in_lung(lung: Lung, rng: np.random.Generator, spread: float = 0.55) -> tuple[float, float]:
    angle, radius = rng.uniform(0, 2 * np.pi), spread * math.sqrt(rng.uniform(0, 1))
    return lung.cx + radius * lung.rx * math.cos(angle), lung.cy + radius * lung.ry * math.sin(angle)


def _in_lung(canvas: Canvas, lung: Lung, win: Window, weight: np.ndarray, amount: float,
             mark: bool) -> None:
    canvas.add(win, weight * lung.weight[win], amount, mark)


def _pick(anatomy: Anatomy, rng: np.random.Generator) -> Lung:
    return anatomy.lungs[rng.integers(len(anatomy.lungs))]


def cardiomegaly(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """A larger cardiac silhouette of the same density (only the added rim is drawn)."""
    cx, cy, rx, ry = anatomy.heart
    grow = 1 + 0.45 * strength * rng.uniform(0.85, 1.15)
    shift = (-0.06 if anatomy.lateral else 0.06) * (grow - 1)
    win, big = canvas.ellipse(cx + shift, cy, rx * grow, ry * (1 + (grow - 1) / 2), edge=0.08)
    _, normal = canvas.ellipse(cx, cy, rx, ry, edge=0.08, win=win)
    canvas.add(win, np.clip(big - normal, 0, 1), 0.19)
    if strength >= 1:
        canvas.mark(win, big > 0.5)


def enlarged_cardiomediastinum(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator,
                               strength: float) -> None:
    width = 0.1 + 0.08 * strength * rng.uniform(0.8, 1.2)
    win, weight = canvas.ellipse(anatomy.mediastinum_x, -0.3 * anatomy.scale, width, 0.36, edge=0.1)
    canvas.add(win, weight, 0.24, strength >= 1)


def lung_opacity(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = _pick(anatomy, rng)
    cx, cy = _point_in_lung(lung, rng)
    win, weight = canvas.ellipse(cx, cy, rng.uniform(0.14, 0.22), rng.uniform(0.14, 0.26), edge=0.25)
    _in_lung(canvas, lung, win, weight, 0.16 * strength, strength >= 1)


def lung_lesion(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = _pick(anatomy, rng)
    cx, cy = _point_in_lung(lung, rng, 0.7)
    radius = rng.uniform(0.04, 0.065)
    win, weight = canvas.ellipse(cx, cy, radius, radius * rng.uniform(0.85, 1.15), edge=0.06)
    canvas.add(win, weight, 0.36 * strength, strength >= 1)


def edema(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Bilateral perihilar ('bat-wing') haze, densest at the hila."""
    sigma = rng.uniform(0.2, 0.26)
    for lung in anatomy.lungs:
        hx = anatomy.mediastinum_x + 0.55 * (lung.cx - anatomy.mediastinum_x)
        win = canvas.window(hx, lung.cy, 3 * sigma, 3 * sigma)
        u, v = canvas.coords(win)
        haze = np.exp(-((u - hx) ** 2 + (v - lung.cy - 0.05) ** 2) / (2 * sigma * sigma))
        _in_lung(canvas, lung, win, haze, 0.28 * strength, strength >= 1)


def consolidation(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    lung = _pick(anatomy, rng)
    cx, cy = _point_in_lung(lung, rng)
    win, weight = canvas.ellipse(cx, cy, rng.uniform(0.1, 0.17), rng.uniform(0.09, 0.16),
                                 angle=rng.uniform(0, np.pi), edge=0.12)
    _in_lung(canvas, lung, win, weight, 0.34 * strength, strength >= 1)


def pneumonia(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """A cluster of fluffy airspace opacities in one zone."""
    lung = _pick(anatomy, rng)
    cx, cy = _point_in_lung(lung, rng, 0.45)
    for _ in range(rng.integers(4, 8)):
        bx, by = cx + rng.normal(0, 0.07), cy + rng.normal(0, 0.09)
        radius = rng.uniform(0.04, 0.075)
        win, weight = canvas.ellipse(bx, by, radius, radius * rng.uniform(0.8, 1.25), edge=0.3)
        _in_lung(canvas, lung, win, weight, 0.18 * strength, strength >= 1)


def atelectasis(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Plate-like band at a lung base."""
    lung = _pick(anatomy, rng)
    cx = lung.cx + rng.uniform(-0.3, 0.3) * lung.rx
    cy = lung.cy + rng.uniform(0.35, 0.55) * lung.ry
    win, weight = canvas.ellipse(cx, cy, rng.uniform(0.15, 0.21), rng.uniform(0.025, 0.04),
                                 angle=rng.uniform(-0.35, 0.35), edge=0.12)
    _in_lung(canvas, lung, win, weight, 0.38 * strength, strength >= 1)


def pneumothorax(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Air outside a partly collapsed lung: darker, markingless rim and a thin visceral pleural line."""
    lung = _pick(anatomy, rng)
    shrink = 1 - 0.2 * rng.uniform(0.8, 1.2)
    cx = lung.cx - lung.lateral_sign * lung.rx * (1 - shrink) * 0.8
    cy = lung.cy + lung.ry * (1 - shrink) * 0.8
    win = canvas.window(lung.cx, lung.cy, lung.rx * 1.3, lung.ry * 1.3)
    u, v = canvas.coords(win)
    radius = np.sqrt(((u - cx) / (lung.rx * shrink)) ** 2 + ((v - cy) / (lung.ry * shrink)) ** 2)
    outside = _sigmoid((radius - 1) / 0.03) * lung.weight[win]
    canvas.add(win, outside, -0.14 * strength, strength >= 1)
    canvas.add(win, np.exp(-(((radius - 1) / 0.012) ** 2)) * lung.weight[win], 0.12 * strength)


def pleural_effusion(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Dependent fluid with a meniscus rising laterally; blunts the costophrenic angle."""
    lungs = anatomy.lungs if rng.uniform() < 0.35 else [_pick(anatomy, rng)]
    for lung in lungs:
        level = lung.cy + lung.ry * rng.uniform(0.25, 0.55)
        win = canvas.window(lung.cx, lung.cy, lung.rx * 1.2, lung.ry * 1.2)
        u, v = canvas.coords(win)
        outward = np.clip((u - lung.cx) / lung.rx * lung.lateral_sign, 0, 1)
        meniscus = level - 0.2 * lung.ry * outward**2
        fluid = _sigmoid((v - meniscus) / 0.03)
        _in_lung(canvas, lung, win, fluid, 0.34 * strength, strength >= 1)


def pleural_other(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Pleural thickening along the lateral chest wall."""
    lung = _pick(anatomy, rng)
    win = canvas.window(lung.cx, lung.cy, lung.rx * 1.2, lung.ry * 1.2)
    u, v = canvas.coords(win)
    du, dv = (u - lung.cx) / lung.rx, (v - lung.cy) / lung.ry
    ring = np.exp(-(((np.sqrt(du * du + dv * dv) - 0.96) / 0.06) ** 2))
    ring *= _sigmoid((du * lung.lateral_sign - 0.35) / 0.08) * _sigmoid((rng.uniform(0.2, 0.6) - dv) / 0.05)
    canvas.add(win, ring, 0.26 * strength, strength >= 1)


def fracture(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """A rib fracture: bright callus with a dark cortical break, near the lateral wall."""
    lung = _pick(anatomy, rng)
    cx = lung.cx + lung.lateral_sign * lung.rx * rng.uniform(0.7, 0.9)
    cy = lung.cy + lung.ry * rng.uniform(-0.5, 0.3)
    win, weight = canvas.ellipse(cx, cy, 0.045, 0.032, angle=rng.uniform(-0.4, 0.4), edge=0.1)
    canvas.add(win, weight, 0.34 * strength, strength >= 1)
    canvas.add(*canvas.ellipse(cx, cy, 0.007, 0.04, edge=0.2), -0.22 * strength)


def support_devices(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator, strength: float) -> None:
    """Tubes, lines and a pacemaker: thin, very bright, unmistakable foreign bodies."""
    mark = strength >= 1
    x, k = anatomy.mediastinum_x, anatomy.scale
    devices = [name for name in ("tube", "line", "pacer") if rng.uniform() < 0.55] or ["tube"]
    if "tube" in devices:  # endotracheal / nasogastric tube down the midline
        win, weight = canvas.ellipse(x + rng.normal(0, 0.02), -0.7 * k, 0.012, 0.55 * k, edge=0.2)
        canvas.add(win, weight, 0.5 * strength, mark)
    if "line" in devices:  # central venous line from the shoulder towards the cava
        side = rng.choice([-1.0, 1.0])
        start, end = np.array([side * 0.65 * k, -0.8 * k]), np.array([x + side * 0.05, -0.05 * k])
        mid, delta = (start + end) / 2, end - start
        win, weight = canvas.ellipse(mid[0], mid[1], float(np.hypot(*delta)) / 2, 0.011,
                                     angle=math.atan2(delta[1], delta[0]), edge=0.2)
        canvas.add(win, weight, 0.45 * strength, mark)
    if "pacer" in devices:  # generator box below the clavicle
        side = rng.choice([-1.0, 1.0])
        win, weight = canvas.ellipse(side * 0.58 * k, -0.72 * k, 0.09, 0.06, edge=0.05)
        canvas.add(win, weight, 0.6 * strength, mark)


PAINTERS: dict[str, Painter] = {
    "Enlarged Cardiomediastinum": enlarged_cardiomediastinum,
    "Cardiomegaly": cardiomegaly,
    "Lung Opacity": lung_opacity,
    "Lung Lesion": lung_lesion,
    "Edema": edema,
    "Consolidation": consolidation,
    "Pneumonia": pneumonia,
    "Atelectasis": atelectasis,
    "Pneumothorax": pneumothorax,
    "Pleural Effusion": pleural_effusion,
    "Pleural Other": pleural_other,
    "Fracture": fracture,
    "Support Devices": support_devices,
}
"""CheXpert observation → painter ('No Finding' draws nothing)."""


def bacterial_pneumonia(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Kermany's bacterial cases: focal lobar consolidation, sometimes with effusion."""
    consolidation(canvas, anatomy, rng, 1.0)
    pneumonia(canvas, anatomy, rng, 1.0)
    if rng.uniform() < 0.2:
        pleural_effusion(canvas, anatomy, rng, 1.0)


def viral_pneumonia(canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Kermany's viral cases: diffuse bilateral interstitial pattern."""
    edema(canvas, anatomy, rng, 0.7)
    canvas.mask[:] = 0  # the haze is diffuse; the patchy opacities below are the lesion
    for _ in range(2):
        pneumonia(canvas, anatomy, rng, 1.0)


@dataclass(frozen=True, slots=True)
class Drawn:
    pixels: np.ndarray
    """uint8 H×W radiograph."""
    mask: np.ndarray | None
    """uint16 H×W lesion mask (bit i: label i drawn there), None when nothing was drawn at full strength."""


Draw = Callable[[Canvas, Anatomy, np.random.Generator], None]
"""A painter with its strength bound (functools.partial), or a whole-image routine."""


def _as_label(bit: int, draw: Draw, canvas: Canvas, anatomy: Anatomy, rng: np.random.Generator) -> None:
    canvas.bit = bit
    draw(canvas, anatomy, rng)


def labelled(bit: int, draw: Draw) -> Draw:
    """`draw`, marking its mask pixels with `bit` (a label's bit: `shards.lesion.label_bit`)."""
    return partial(_as_label, bit, draw)


def render(height: int, width: int, rng: np.random.Generator, lateral: bool, draws: list[Draw]) -> Drawn:
    """Anatomy, then each finding, then exposure and noise."""
    canvas = Canvas(height, width)
    anatomy = draw_anatomy(canvas, rng, lateral)
    for draw in draws:
        draw(canvas, anatomy, rng)
    pixels = finish(canvas, rng)
    return Drawn(pixels, canvas.mask if canvas.mask.any() else None)
