"""bench/gpu.py: the GPU benchmark's every code path that needs no GPU, run on the CPU (`--smoke`),
so the prepared device command cannot rot while no GPU is lent. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
LAST_LINE = re.compile(r"gpu: vit_tiny_patch16_224=(\d+|n/a) resnet10t=(\d+|n/a) e2e_ratio=(\d+\.\d\d|n/a)")


def run_smoke(tmp_path: Path, *extra: str) -> tuple[str, dict, str]:
    out = tmp_path / "out"
    env = os.environ | {"CXR_BENCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    return result.stdout, report, (out / "gpu.md").read_text()


def hand_forward_flops(name: str, size: int) -> float:
    """2 × multiply-adds of every conv and linear layer, from their shapes (forward hooks): an
    estimate that shares nothing with FlopCounterMode."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=14, in_chans=3).eval()
    total = 0.0

    def count(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2.0 * output[0].numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            total += 2.0 * module.in_features * module.out_features

    for module in model.modules():
        module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return total


@pytest.mark.slow
def test_smoke_run_writes_every_section_with_figures(tmp_path: Path) -> None:
    stdout, report, table = run_smoke(tmp_path)
    assert report["mode"] == "smoke" and report["machine"]["torch"] and report["machine"]["cpus"] >= 1

    measured = [c for c in report["model_only"] if c["status"] == "ok"]
    assert {(c["model"], c["batch"]) for c in measured} == {
        (m, b) for m in ("resnet10t", "vit_tiny_patch16_224") for b in (8, 4)}
    assert all(not c["compile"] for c in measured)
    for case in measured:
        assert case["img_s"] > 0 and case["step_ms"] > 0 and case["fwd_gflop_per_img"] > 0 and case["mfu"] > 0
    compiled = [c for c in report["model_only"] if c["compile"]]
    assert compiled and all(c["status"].startswith("skipped: smoke") for c in compiled)

    # FlopCounterMode (meta device) against a hand count from the layers' shapes.
    resnet = next(c for c in measured if c["model"] == "resnet10t")
    hand = hand_forward_flops("resnet10t", 64)
    assert 0.9 < resnet["fwd_gflop_per_img"] * 1e9 / hand < 1.1, (resnet["fwd_gflop_per_img"], hand / 1e9)

    streamed = [c for c in report["end_to_end"] if c["decode"] == "cpu"]
    assert {c["model"] for c in streamed} == {"resnet10t", "vit_tiny_patch16_224"}
    for case in streamed:
        assert case["status"] == "ok", case
        assert case["img_s"] > 0 and case["ratio"] > 0 and case["model_only_img_s"] > 0
        assert 0.0 <= case["gpu_data_wait"] <= 1.0 and 0.0 <= case["host_wait"] <= 1.0
    nvjpeg = [c for c in report["end_to_end"] if c["decode"] == "cuda"]
    assert nvjpeg and all(c["status"].startswith("skipped: needs CUDA") for c in nvjpeg)

    fixed = report["fixed_costs"]
    assert [c["model"] for c in fixed["eval"]] == ["resnet10t", "vit_tiny_patch16_224"]
    for case in fixed["eval"]:
        assert case["status"] == "ok" and case["images"] > 0 and case["seconds"] > 0
    for case in fixed["checkpoint"]:  # weights + AdamW moments: well over a MiB for ~5 M parameters
        assert case["status"] == "ok" and case["seconds"] > 0 and case["mib"] > 10
    assert len(fixed["compile"]) == len(compiled)

    assert [g["met"] is not None for g in report["goals"]] == [True, True, True]
    for heading in ("## Goals", "## Model-only training", "## End-to-end", "## Fixed costs per run",
                    "not performance figures"):
        assert heading in table and heading in stdout
    last = stdout.strip().splitlines()[-1]
    assert LAST_LINE.fullmatch(last), last
    assert "n/a" not in last


@pytest.mark.slow
def test_budget_spent_skips_every_case_but_still_reports(tmp_path: Path) -> None:
    stdout, report, table = run_smoke(tmp_path, "--budget-s", "0")
    cases = report["model_only"] + report["end_to_end"] + report["fixed_costs"]["eval"]
    statuses = {c["status"].split(" (")[0] for c in cases}
    assert statuses <= {"skipped: budget", "skipped: smoke", "skipped: needs CUDA"}, statuses
    assert "skipped: budget" in statuses
    assert not (tmp_path / "cache").exists()  # nothing was packed for cases that never ran
    assert "## Goals" in table
    assert stdout.strip().splitlines()[-1] == "gpu: vit_tiny_patch16_224=n/a resnet10t=n/a e2e_ratio=n/a"


def load_script() -> object:
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_goals_and_table_from_gpu_figures() -> None:
    """The report side of a real GPU run (figures made up): best case per goal, met / not met."""
    gpu = load_script()
    model_only = [
        {"model": "vit_base_patch16_224", "batch": 256, "compile": False, "img_s": 3100.0, "status": "ok"},
        {"model": "vit_base_patch16_224", "batch": 256, "compile": True, "img_s": 3700.0, "status": "ok",
         "compile_s": 41.0, "first_step_s": 42.0, "peak_mem_gib": 30.1, "mfu": 0.39},
        {"model": "resnet50", "batch": 256, "compile": False, "img_s": 4000.0, "status": "ok"},
        {"model": "resnet50", "batch": 256, "compile": True, "status": "skipped: budget (3 s left)"},
    ]
    e2e = [
        {"model": "resnet50", "workers": 14, "decode": "cpu", "ratio": 0.7, "status": "ok"},
        {"model": "resnet50", "workers": 14, "decode": "cuda", "ratio": 0.95, "status": "ok"},
        {"model": "vit_base_patch16_224", "workers": 14, "decode": "cpu", "ratio": 0.92, "status": "ok"},
    ]
    goals = gpu.goals(gpu.FULL, model_only, e2e)
    assert [(g["value"], g["met"]) for g in goals] == [(3700.0, True), (4000.0, False), (0.92, True)]
    assert goals[0]["where"] == "batch 256, compiled"
    report = {"mode": "full", "machine": {"gpu": "NVIDIA H200", "cpus": 16, "python": "3.12.3",
                                          "torch": "2.11.0", "cuda": "13.0", "timm": "1.0"},
              "command": "python3 bench/gpu.py", "elapsed_s": 400.0, "precision": "bf16 autocast",
              "image_size": 224, "peak_tflops": 989.0, "model_only": model_only, "end_to_end": e2e,
              "fixed_costs": {"compile": [model_only[1]], "eval": [], "checkpoint": []},
              "goals": goals}
    table = gpu.markdown(report)
    assert "| vit_base_patch16_224 model-only img/s | ≥ 3500 | 3700 | batch 256, compiled | met |" in table
    assert "| resnet50 model-only img/s | ≥ 4500 | 4000 | batch 256, eager | not met |" in table
    assert "| 0.92 |" in table and "not performance figures" not in table
    assert gpu.summary_line(report, gpu.FULL) == "gpu: vit_base_patch16_224=3700 resnet50=4000 e2e_ratio=0.92"
