"""The README's main job and the benchmarks run end to end (small sizes; no timing is asserted)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"CXR_BENCH_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_runs_and_is_a_no_op_the_second_time(tmp_path: Path) -> None:
    args = ["-m", "shards.demo", "--out", str(tmp_path / "demo"), "--patients", "24", "--size", "96",
            "--batches", "2", "--workers", "1"]
    first = run(args, tmp_path).stdout
    assert "leakage: 0 patients in two splits" in first
    assert re.search(r"train batch: image \(16, 1, 224, 224\) torch.float32, target \(16, 5\)", first)
    assert re.search(r"streamed 32 augmented training images .* \d+ val images exactly once", first)
    second = run(args, tmp_path).stdout
    assert "synth: reusing" in second and "already packed with these options; nothing to do" in second


@pytest.mark.slow
def test_loader_benchmark_prints_its_contract_line(tmp_path: Path) -> None:
    out = run([str(ROOT / "bench" / "loader.py"), "--patients", "16", "--images", "64", "--workers", "1"],
              tmp_path).stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(r"loader: vs_baseline=\d+\.\d\dx vs_ceiling=\d+\.\d\d", lines[-1])
    assert re.fullmatch(r"loader \(warp_on=device\): vs_ceiling=\d+\.\d\d", lines[-2])


@pytest.mark.slow
def test_pack_benchmark_runs(tmp_path: Path) -> None:
    out = run([str(ROOT / "bench" / "pack.py"), "--patients", "8", "--workers", "1"], tmp_path).stdout
    assert re.search(r"pack: \d+ img/s/core at 320 px .* peak RSS ×\d\.\d\d \(pack\)", out)


@pytest.mark.slow
def test_trainer_demo_trains_both_models_and_compares_them(tmp_path: Path) -> None:
    out = run(["-m", "trainer.demo", "--out", str(tmp_path / "demo"), "--patients", "60", "--epochs", "1"],
              tmp_path).stdout
    assert "== cnn: resnet10t" in out and "== vit: vit_tiny_patch16_224" in out
    assert re.search(r"^macro\s+\d\.\d{3}\s+\d\.\d{3}$", out, re.MULTILINE)
    for model in ("cnn", "vit"):
        assert (tmp_path / "demo" / "runs" / model / "best" / "model.safetensors").is_file()
    # ... and ends with the report: both runs, the CNN-vs-ViT paired comparison, browser + markdown.
    report = tmp_path / "demo" / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert {r["name"] for r in summary["runs"]} == {"cnn", "vit"} and len(summary["pairs"]) == 1
    assert (report / "index.html").is_file() and (report / "index.md").is_file()
