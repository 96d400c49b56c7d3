"""trainer.weights: fetch fills the cache timm reads, verify proves offline that each model loads.

No network anywhere: the Hugging Face cache is built here in the hub's on-disk layout from random
weights of timm's tiny test models (under their real hub repo ids), and fetch downloads from a
fake hub that writes that same layout; verify then reads it through timm's own loader.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hub
import pytest
import safetensors.torch
import timm
import torch
import yaml
from huggingface_hub import scan_cache_dir
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from huggingface_hub.file_download import repo_folder_name

from trainer.weights import sources
from trainer.weights.__main__ import main
from trainer.weights.needs import Need, from_space

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VIT, RESNET = "test_vit", "test_resnet"
"""timm's test models: real hub repos (timm/test_vit.r160_in1k), under 0.5 M parameters."""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline hub cache: in the environment (for subprocesses) and in huggingface_hub's
    constants, which it reads once at import (for calls in this process)."""
    path = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return path


def repo_of(name: str) -> str:
    return timm.models.get_pretrained_cfg(name).hf_hub_id


@functools.cache
def random_weights(name: str, fmt: str = "safetensors") -> bytes:
    state = {k: v.contiguous() for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    if fmt == "safetensors":
        return safetensors.torch.save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def put(cache: Path, repo_id: str, filename: str, data: bytes) -> Path:
    """The hub's layout: blobs/<sha256> holds the bytes, snapshots/<commit>/<filename> links to
    it, refs/main names the commit."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / COMMIT / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return link


def config(tmp_path: Path, name: str, **model: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": name, "pretrained": True, **model}}))
    return path


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


def test_verify_passes_offline_on_the_hub_cache(cache: Path, tmp_path: Path) -> None:
    link = put(cache, repo_of(VIT), "model.safetensors", random_weights(VIT))
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [repo_of(VIT)]  # the hub reads our layout
    result = subprocess.run([sys.executable, "-m", "trainer.weights", "verify", "--config",
                             str(config(tmp_path, VIT))], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result.stdout) == [f"ok {VIT} ({link})"]


def test_verify_names_the_model_missing_from_the_cache(cache: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    put(cache, repo_of(VIT), "model.safetensors", random_weights(VIT))
    code = main(["verify", "--config", str(config(tmp_path, VIT)), "--config", str(config(tmp_path, RESNET))])
    out = lines(capsys.readouterr().out)
    assert code == 1
    assert out[0].startswith(f"ok {VIT} (")
    assert out[1].startswith(f"missing {RESNET}: not in the Hugging Face cache {cache} ({repo_of(RESNET)}: ")
    assert len(out) == 2


def test_verify_loads_what_it_finds(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A file in the right place with the wrong tensors (another architecture's) is not ok."""
    put(cache, repo_of(RESNET), "model.safetensors", random_weights(VIT))
    assert main(["verify", "--config", str(config(tmp_path, RESNET))]) == 1
    assert lines(capsys.readouterr().out) == [
        f"missing {RESNET}: cached but does not load: "
        "RuntimeError: Error(s) in loading state_dict for ResNet:"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--config", "nowhere.yaml"], "error: --config nowhere.yaml: no such file"),
    (["--config", "{cfg}", "model.name=resnet50.no_such_tag"],
     "error: {cfg}: model.name: 'resnet50.no_such_tag': Invalid pretrained tag (no_such_tag) for resnet50."),
    (["--space", "{space}"], "error: {space}: config file nowhere.yaml: not found"),
])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], expected: str, cache: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": "nowhere.yaml", "params": {"optim.lr": {"choice": [0.1]}}}))
    paths = {"cfg": str(config(tmp_path, VIT)), "space": str(space)}
    assert main(["verify", *(arg.format(**paths) for arg in argv)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(lines(captured.err)) == 1
    assert captured.err.startswith(expected.format(**paths))


def test_a_space_needs_its_base_configs_under_fixed_and_model_params(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped base config is found from the checkout, as sweeps.run does
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump({
        "base": "trainer/configs/demo_cpu.yaml",  # resnet10t, pretrained: false
        "fixed": {"model.pretrained": True},
        "params": {"model.name": {"choice": [VIT, RESNET]}, "optim.lr": {"loguniform": [1e-4, 1e-2]}},
    }))
    assert [n.name for n in from_space(names)] == [VIT, RESNET]
    local = config(tmp_path, RESNET, weights="resnet.safetensors")  # its own file: no cache needed
    presets = tmp_path / "presets.yaml"
    presets.write_text(yaml.safe_dump({
        "params": {"config": {"choice": [str(config(tmp_path, VIT)), local.name]},
                   "model.freeze": {"choice": ["full", "head"]}},
    }))
    assert from_space(presets) == [Need(VIT, str(tmp_path / f"{VIT}.yaml"))]


def test_fetch_downloads_what_verify_then_loads(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake hub has test_vit's safetensors and config, and only a pytorch_model.bin for
    test_resnet: fetch asks for the safetensors first and falls back, as timm's loader does."""
    remote = {(repo_of(VIT), "model.safetensors"): random_weights(VIT),
              (repo_of(VIT), "config.json"): b"{}",
              (repo_of(RESNET), "pytorch_model.bin"): random_weights(RESNET, "bin")}
    asked = []

    def download(repo_id: str, filename: str, *, revision: str | None = None,
                 local_files_only: bool = False) -> str:
        assert not local_files_only
        asked.append((repo_id, filename))
        if (repo_id, filename) not in remote:
            raise EntryNotFoundError(f"404 {repo_id}/{filename}")
        return str(put(cache, repo_id, filename, remote[repo_id, filename]))

    argv = ["--config", str(config(tmp_path, VIT)), "--config", str(config(tmp_path, RESNET, in_chans=1))]
    with monkeypatch.context() as fake:
        fake.setattr(sources, "hf_hub_download", download)
        assert main(["fetch", *argv]) == 0
    assert asked == [(repo_of(VIT), "model.safetensors"), (repo_of(VIT), "config.json"),
                     (repo_of(RESNET), "model.safetensors"), (repo_of(RESNET), "pytorch_model.bin"),
                     (repo_of(RESNET), "config.json")]
    fetched = lines(capsys.readouterr().out)
    assert main(["verify", *argv]) == 0
    verified = lines(capsys.readouterr().out)
    assert verified == fetched
    assert verified[1].startswith(f"ok {RESNET} (") and verified[1].endswith("/pytorch_model.bin)")


@pytest.mark.parametrize("error", [
    ConnectionError("no route to host"),
    LocalEntryNotFoundError("cannot reach the hub"),  # what hf_hub_download raises offline: not a 404
])
def test_fetch_reports_a_failed_download(error: Exception, cache: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*_: object, **__: object) -> str:
        raise error

    monkeypatch.setattr(sources, "hf_hub_download", unreachable)
    assert main(["fetch", "--config", str(config(tmp_path, VIT))]) == 1
    assert lines(capsys.readouterr().out) == [
        f"missing {VIT}: download failed (HF_HUB_OFFLINE is set: unset it where there is internet): "
        f"{type(error).__name__}: {error}"]
