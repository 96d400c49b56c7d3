"""The explain job: heatmaps for every architecture family at any input size, rollout, scores
against the synthetic lesion masks, the CLI's outputs, and refusal of unsafe checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from shards.labels import COMPETITION5
from tests.trainer_helpers import DEMO_VIT, ROOT
from trainer.config import load_config
from trainer.explain.__main__ import main
from trainer.explain.cam_layers import cam_target
from trainer.explain.localization import energy_in_mask, peak, pointing_hit
from trainer.explain.methods import METHODS
from trainer.explain.rollout import rollout, supports_rollout
from trainer.models import build_model, model_family
from trainer.rundir import export_best


def tiny(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "cnn":
        return timm.create_model("resnet10t", num_classes=3, in_chans=1).eval()
    return timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=8, depth=2, num_classes=3,
                             in_chans=1).eval()


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_heatmaps_have_the_image_shape_and_are_finite(name: str, size: int) -> None:
    model = tiny(name, size)
    images = torch.randn(3, 1, size, size)
    applied = [m for m in METHODS.values() if m.supports(model)]
    assert {m.name for m in applied} >= ({"gradcam", "gradcam++"} | ({"rollout"} if name == "vit" else set()))
    for method in applied:
        maps = method.explain(model, images, 1)
        assert maps.shape == (3, size, size) and maps.dtype == np.float32, method.name
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1, method.name
    assert all(p.requires_grad for p in model.parameters()), "CAMs leave the model as they found it"


def test_rollout_is_not_uniform_and_restores_fused_attention() -> None:
    model = tiny("vit", 64)
    fused = [block.attn.fused_attn for block in model.blocks]
    maps = rollout(model, torch.randn(2, 1, 64, 64))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.std(axis=(1, 2)).min() > 0.05, "rollout must differ from a uniform map"
    assert [block.attn.fused_attn for block in model.blocks] == fused
    assert not supports_rollout(tiny("cnn", 64))


def layer_output(model: torch.nn.Module, layer: torch.nn.Module, size: int) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    handle.remove()
    return seen[0]


def test_cam_layers_follow_the_architecture_not_hard_coded_sizes() -> None:
    """Prefix tokens (class, registers, distillation) are dropped and the grid comes from the
    patch embedding; Swin's channels-last stages are permuted; CNNs use a named feature stage."""
    torch.manual_seed(0)
    models = {
        "registers": timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=1,
                                       reg_tokens=4, num_classes=2),
        "distilled": timm.create_model("deit_tiny_distilled_patch16_224", img_size=96, patch_size=8, depth=1,
                                       num_classes=2),
        "hybrid": timm.create_model("vit_tiny_r_s16_p8_224", img_size=96, depth=1, num_classes=2),
        "swin": timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1),
                                  num_heads=(1, 1, 1, 1), num_classes=2),
    }
    grids = {"registers": (8, 8), "distilled": (12, 12), "hybrid": (3, 3), "swin": (7, 7)}
    for key, model in models.items():
        model.eval()
        size = 224 if key == "swin" else model.patch_embed.img_size[0]
        target = cam_target(model, size, size)
        grid = layer_output(model, target.layer, size)
        grid = target.reshape(grid) if target.reshape else grid
        assert tuple(grid.shape[-2:]) == grids[key], key
        assert model_family(model) == ("swin" if key == "swin" else "vit"), key
        maps = METHODS["gradcam"].explain(model, torch.randn(2, 3, size, size), 0)
        assert maps.shape == (2, size, size) and np.isfinite(maps).all(), key
    assert not supports_rollout(models["swin"]) and supports_rollout(models["distilled"])
    resnet, densenet = tiny("cnn", 224), timm.create_model("densenet121", num_classes=2)
    names = {id(module): name for name, module in [*resnet.named_modules(), *densenet.named_modules()]}
    assert names[id(cam_target(resnet, 224, 224).layer)] == "layer4"
    assert names[id(cam_target(densenet, 224, 224).layer)] == "features.norm5"
    assert names[id(cam_target(resnet, 64, 64).layer)] == "layer3", "2×2 layer4 maps name only a quadrant"


def test_pointing_game_and_energy() -> None:
    mask = np.zeros((8, 8), bool)
    mask[2:4, 5:7] = True
    heat = np.zeros((8, 8), np.float32)
    heat[3, 6] = 1.0
    assert pointing_hit(heat, mask) and energy_in_mask(heat, mask) == 1.0
    assert not pointing_hit(np.ones((8, 8)), mask), "a flat map points nowhere"
    plateau = np.zeros((8, 8), np.float32)
    plateau[4:, 4:] = 1.0  # an upsampled coarse map: the tie is broken at the plateau's centre
    assert peak(plateau) in {(5, 5), (5, 6), (6, 5), (6, 6)}
    assert energy_in_mask(np.ones((8, 8)), mask) == pytest.approx(mask.mean())


# --- end to end on a trained tiny CNN --------------------------------------------------------


@pytest.fixture(scope="module")
def untrained_vit(learn_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT run directory exported without training: enough to compare side by side with rollout."""
    run_dir = tmp_path_factory.mktemp("explain") / "vit"
    config = load_config(DEMO_VIT, [f"data.shards={learn_shards}", f"run.dir={run_dir}", "data.image_size=96",
                                    "model.kwargs={img_size: 96, patch_size: 8, depth: 2}"])
    torch.manual_seed(0)
    model = build_model(config.model, num_classes=len(COMPETITION5))
    export_best(run_dir, model.state_dict(), config, {"labels": list(COMPETITION5)})
    return run_dir


@pytest.mark.slow
def test_trained_cnn_points_at_the_lesion_and_writes_the_gallery(cnn_run: Path, untrained_vit: Path,
                                                                 learn_shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rolled_out: list[int] = []
    real = METHODS["rollout"]

    def counted(model: torch.nn.Module, images: torch.Tensor, index: int) -> np.ndarray:
        rolled_out.append(len(images))
        return real.explain(model, images, index)

    monkeypatch.setitem(METHODS, "rollout", dataclasses.replace(real, explain=counted))
    out = tmp_path / "explain"
    code = main(["--run", str(cnn_run), str(untrained_vit), "--shards", str(learn_shards),
                 "--split", "test", "--n", "24", "--steps", "2", "--workers", "0", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    scores = json.loads((out / "localization.json").read_text())
    assert set(scores) == {"cnn", "vit"}
    assert set(scores["cnn"]) == {"gradcam", "gradcam++"}
    assert set(scores["vit"]) == {"gradcam", "gradcam++", "rollout"}
    chosen = json.loads((out / "explain.json").read_text())["samples"]
    distinct = len({key for keys in chosen.values() for key in keys})
    per_label = sum(len(keys) for keys in chosen.values())
    assert sum(rolled_out) == distinct < per_label, "class-agnostic rollout: once per sample, not per label"
    for methods in scores.values():
        for labels in methods.values():
            assert set(labels) == set(COMPETITION5)
            for cell in labels.values():
                assert {"pointing_game", "energy_in_mask", "n", "random_pointing"} <= set(cell)
    cells = list(scores["cnn"]["gradcam"].values())
    total = sum(c["n"] for c in cells)
    hits = sum(c["pointing_game"] * c["n"] for c in cells if c["n"])
    chance = sum(c["random_pointing"] * c["n"] for c in cells if c["n"])
    assert total >= 30
    assert hits / total > chance / total + 0.2, (hits / total, chance / total, cells)
    effusion = scores["cnn"]["gradcam"]["Pleural Effusion"]
    assert effusion["energy_in_mask"] > 1.5 * effusion["random_pointing"], effusion
    assert effusion["deletion_auc"] is not None and effusion["insertion_auc"] is not None
    # Gallery: a grid per label, per-sample overlays, the HTML page, TensorBoard images.
    for label in ("Atelectasis", "Pleural_Effusion"):
        grid = Image.open(out / "grids" / f"{label}.png")
        assert grid.mode == "RGB" and grid.size[1] > 24 * 96
    overlays = list((out / "overlays").rglob("*.png"))
    assert len(overlays) == 5 * 24 * (2 + 3)
    assert Image.open(overlays[0]).size in {(64, 64), (96, 96)}
    page = (out / "index.html").read_text()
    assert "grids/Pleural_Effusion.png" in page and "overlays/vit/rollout/" in page
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "| cnn | gradcam | Pleural Effusion |" in (out / "localization.md").read_text()
    assert not list(out.rglob(".*.tmp")), "every file renamed into place"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.explain", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)


class Payload:
    """Unpickling this runs code with a visible effect (it creates `marker`): what weights_only and
    safetensors loading must refuse before anything runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.slow
def test_a_checkpoint_that_is_not_a_safe_tensor_file_is_refused(cnn_run: Path, learn_shards: Path,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    run, marker = tmp_path / "run", tmp_path / "pickled-code-ran"
    shutil.copytree(cnn_run / "best", run / "best")
    (run / "best" / "model.safetensors").write_bytes(pickle.dumps({"weights": Payload(marker)}))
    result = run_cli("--run", str(run), "--shards", str(learn_shards), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "safetensors" in result.stderr
    assert not marker.exists(), "model.safetensors was unpickled"

    (run / "best" / "model.safetensors").unlink()
    torch.save({"weights": Payload(marker)}, run / "best" / "model.pt")
    capsys.readouterr()
    assert main(["--run", str(run), "--shards", str(learn_shards), "--out", str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {run / 'best' / 'model.pt'}: refused"), errors
    assert not marker.exists(), "model.pt was unpickled with weights_only=False: its code ran"
    assert not (tmp_path / "out" / "localization.json").exists()
    assert main(["--run", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
