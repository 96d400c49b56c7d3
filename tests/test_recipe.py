"""The learning-rate transfer rule and the pinned global batch (trainer/recipe.py): the numbers a
launch on 1 or 8 GPUs trains with, against hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.trainer_helpers import DEMO
from trainer import rundir
from trainer.config import ConfigError, load_config
from trainer.recipe import resolve

LR = 1e-4


def config(*overrides: str):
    return load_config(DEMO, [f"optim.lr={LR}", "data.batch_size=64", *overrides], environment=False)


@pytest.mark.parametrize(("rule", "one_gpu", "eight_gpus"), [
    ("linear", LR * 64 / 256, LR * 512 / 256),          # 2.5e-5 and 2e-4
    ("sqrt", LR * math.sqrt(0.25), LR * math.sqrt(2)),  # 5e-5 and 1.41e-4
    ("none", LR, LR),
])
def test_effective_lr_on_one_and_eight_gpus_follows_the_rule(rule: str, one_gpu: float,
                                                             eight_gpus: float) -> None:
    cfg = config(f"optim.lr_scaling={rule}")
    one, eight = resolve(cfg, processes=1), resolve(cfg, processes=8)
    assert (one.global_batch, eight.global_batch) == (64, 512)
    assert one.effective_lr == pytest.approx(one_gpu, rel=1e-12)
    assert eight.effective_lr == pytest.approx(eight_gpus, rel=1e-12)


def test_gradient_accumulation_and_reference_batch_enter_the_global_batch() -> None:
    cfg = config("optim.lr_scaling=linear", "optim.grad_accum=4", "optim.lr_ref_batch=512")
    resolved = resolve(cfg, processes=2)
    assert resolved.global_batch == 64 * 2 * 4
    assert resolved.effective_lr == pytest.approx(LR * 512 / 512)


def test_a_pinned_global_batch_trains_the_same_on_any_number_of_processes() -> None:
    cfg = config("optim.lr_scaling=linear", "data.global_batch=64")
    one, two, eight = (resolve(cfg, n) for n in (1, 2, 8))
    assert [r.batch_size for r in (one, two, eight)] == [64, 32, 8]
    assert one.global_batch == two.global_batch == eight.global_batch == 64
    assert one.effective_lr == two.effective_lr == eight.effective_lr == pytest.approx(LR / 4)


def test_a_global_batch_that_does_not_split_is_one_line() -> None:
    cfg = config("data.global_batch=100", "optim.grad_accum=2")
    with pytest.raises(ConfigError, match=r"^data.global_batch: 100 does not split over 8 processes × "
                                          r"optim.grad_accum 2: expected a multiple of 16$"):
        resolve(cfg, 8)


def test_bad_rule_and_reference_batch_are_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr_scaling: 'cubic' is not one of"):
        config("optim.lr_scaling=cubic")
    with pytest.raises(ConfigError, match=r"optim\.lr_ref_batch: must be ≥ 1"):
        config("optim.lr_ref_batch=0")


def test_config_yaml_records_the_launch_and_reads_back_as_the_config(tmp_path: Path) -> None:
    cfg = config("optim.lr_scaling=sqrt")
    resolved = resolve(cfg, 4)
    rundir.write_config(tmp_path, cfg, resolved.to_dict())
    raw = yaml.safe_load((tmp_path / rundir.CONFIG).read_text())
    assert raw["resolved"]["effective_lr"] == pytest.approx(LR * math.sqrt(256 / 256))
    assert rundir.read_resolved(tmp_path)["processes"] == 4
    again = rundir.read_config(tmp_path)  # the block is a record: the config loads without it
    assert again.to_dict() == cfg.to_dict()


def test_a_config_written_before_the_rule_keeps_its_lr(tmp_path: Path) -> None:
    old = config().to_dict()
    del old["optim"]["lr_scaling"], old["optim"]["lr_ref_batch"], old["data"]["global_batch"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_config(tmp_path / "config.yaml", environment=False)
    assert resolve(cfg, 8).effective_lr == LR, "no rule: the lr a run always had, at any batch"
    assert rundir.read_resolved(tmp_path) == {}
