"""What a person looks at: overlays, one comparison grid per label, an HTML page, TensorBoard.

Pure numpy + Pillow (no matplotlib, no OpenCV): a jet-like colormap, the lesion outline in
green, text from Pillow's built-in font. Every file is written under a temporary name and
renamed, so a reader never sees half an image.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shards.atomic import replacing, write_text

OUTLINE = np.array([40, 255, 90], dtype=np.uint8)
HEADER = 14
GUTTER = 150


def slug(text: str) -> str:
    """A file-name-safe form of a label, key or model name ('gradcam++' → 'gradcamplusplus')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("+", "plus")).strip("_") or "_"


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """[0, 1] H×W → uint8 H×W×3, blue (cold) → cyan → yellow → red (hot), like 'jet'."""
    x = np.clip(heatmap, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2),
                                  1.5 - np.abs(4 * x - 1)], axis=-1), 0.0, 1.0)
    return (rgb * 255 + 0.5).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (in the mask, with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(gray: np.ndarray, heatmap: np.ndarray | None, mask: np.ndarray | None,
            alpha: float = 0.45) -> np.ndarray:
    """The image (H×W in [0, 1]) with the heatmap blended in and the lesion outlined: uint8 RGB."""
    base = np.repeat((np.clip(gray, 0, 1) * 255)[..., None], 3, axis=-1)
    if heatmap is not None:
        base = (1 - alpha) * base + alpha * colorize(heatmap).astype(np.float32)
    rgb = base.astype(np.uint8)
    if mask is not None and mask.any():
        rgb[outline(mask)] = OUTLINE
    return rgb


def save_png(rgb: np.ndarray, path: Path) -> None:
    with replacing(path) as temp:
        Image.fromarray(rgb).save(temp, format="PNG")


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))


def grid(columns: list[str], rows: list[str], cells: list[list[np.ndarray]], size: int) -> np.ndarray:
    """Cells (uint8 RGB, any square size) in a table with a header row and a row-label gutter."""
    width, height = GUTTER + size * len(columns), HEADER + size * len(rows)
    canvas = Image.new("RGB", (width, max(height, HEADER + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(columns):
        draw.text((GUTTER + col * size + 2, 1), title[: max(4, size // 6)], fill=(0, 0, 0))
    for row, (title, row_cells) in enumerate(zip(rows, cells, strict=True)):
        top = HEADER + row * size
        for line, text in enumerate(title.split("\n")):
            draw.text((2, top + 2 + 11 * line), text[:24], fill=(0, 0, 0))
        for col, cell in enumerate(row_cells):
            canvas.paste(Image.fromarray(_resize(cell, size)), (GUTTER + col * size, top))
    return np.asarray(canvas)


@dataclass
class LabelSection:
    """One label's part of the HTML page."""

    label: str
    grid_path: str
    columns: list[str]
    rows: list[tuple[str, str, list[str]]]
    """(key, caption, overlay paths relative to OUT, one per column)."""


def score_table(scores: dict) -> str:
    """localization.json's scores as rows: model, method, label and the numbers."""
    lines = ["| model | method | label | pointing game | random point | energy in mask | n | "
             "deletion AUC ↓ | insertion AUC ↑ |", "|---|---|---|---|---|---|---|---|---|"]
    for model, methods in scores.items():
        for method, labels in methods.items():
            for label, cell in labels.items():
                values = [cell[k] for k in ("pointing_game", "random_pointing", "energy_in_mask", "n",
                                            "deletion_auc", "insertion_auc")]
                shown = ["–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in values]
                lines.append(f"| {model} | {method} | {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def write_index(out: Path, title: str, table_md: str, sections: list[LabelSection]) -> None:
    """OUT/index.html: the score table, then per label its grid and every sample's overlays."""
    esc = html.escape
    rows_md = [line for line in table_md.strip().splitlines() if not line.startswith("|---")]
    table = "".join("<tr>" + "".join(f"<td>{esc(c.strip())}</td>" for c in line.strip("|").split("|"))
                    + "</tr>\n" for line in rows_md)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif}td{padding:2px 6px;border:1px solid #ccc}"
             "img{image-rendering:pixelated}table{border-collapse:collapse}</style>",
             f"<h1>{esc(title)}</h1>",
             "<p>Green outline: the label's ground-truth lesion. Pointing game: the map's maximum lies in "
             "the lesion (random point: the lesion's area share). Energy in mask: share of the map inside "
             "it. Research use only, not for clinical use.</p>",
             f"<table>{table}</table>"]
    for section in sections:
        parts.append(f"<h2 id='{esc(slug(section.label))}'>{esc(section.label)}</h2>")
        parts.append(f"<p><img src='{esc(section.grid_path)}' alt='{esc(section.label)} grid'></p>")
        header = "".join(f"<th>{esc(c)}</th>" for c in ["sample", *section.columns])
        body = []
        for key, caption, images in section.rows:
            cells = "".join(f"<td><img src='{esc(p)}' width='128'></td>" for p in images)
            body.append(f"<tr><td>{esc(key)}<br>{esc(caption)}</td>{cells}</tr>")
        parts.append(f"<details><summary>samples</summary><table><tr>{header}</tr>{''.join(body)}"
                     "</table></details>")
    write_text(out / "index.html", "\n".join(parts) + "\n")


def log_images(out: Path, images: dict[str, np.ndarray]) -> None:
    """The grids into TensorBoard (OUT/tensorboard), one image tag per label."""
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - only when writing

    writer = SummaryWriter(str(out / "tensorboard"))
    try:
        for tag, rgb in images.items():
            writer.add_image(f"explain/{tag}", rgb, 0, dataformats="HWC")
    finally:
        writer.close()
