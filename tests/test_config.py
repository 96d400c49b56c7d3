"""Config tree: YAML, dotted overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, load_config

DEMO = Path(__file__).resolve().parents[1] / "trainer" / "configs" / "demo_cpu.yaml"


def test_yaml_then_overrides(chexpert_shards: Path, tmp_path: Path) -> None:
    config = load_config(DEMO, [f"data.shards={chexpert_shards}", "optim.lr=3e-4", "model.freeze=head",
                                "data.labels=[Edema, Cardiomegaly]", "optim.clip_grad=null", "optim.epochs=7",
                                "model.kwargs={depth: 2}"])
    assert config.optim.lr == 3e-4 and config.model.freeze == "head" and config.optim.clip_grad is None
    assert config.data.labels == ["Edema", "Cardiomegaly"] and config.model.kwargs == {"depth": 2}
    assert config.model.name == "resnet10t" and config.optim.epochs == 7
    config.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config, "a saved config loads back identically"


def test_a_bare_no_on_the_command_line_is_the_string_no(chexpert_shards: Path) -> None:
    """YAML 1.1 reads `no` as false: `run.precision=no` must still mean "no mixed precision"."""
    config = load_config(DEMO, [f"data.shards={chexpert_shards}", "run.precision=bf16", "run.precision=no"])
    assert config.run.precision == "no"


def test_defaults_need_only_the_shards(chexpert_shards: Path) -> None:
    assert load_config(None, [f"data.shards={chexpert_shards}"]).model == Config().model


def test_layer_decay_mode_defaults_to_group_for_configs_written_before_it(chexpert_shards: Path,
                                                                           tmp_path: Path) -> None:
    config = load_config(DEMO, [f"data.shards={chexpert_shards}", "model.layer_decay_mode=depth"])
    assert config.model.layer_decay_mode == "depth"
    config.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "  layer_decay_mode: depth\n" in text
    (tmp_path / "old.yaml").write_text(text.replace("  layer_decay_mode: depth\n", ""))
    assert load_config(tmp_path / "old.yaml").model.layer_decay_mode == "group"


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.freez=head"], "unknown config key model.freez (expected one of:"),
    (["training.lr=1"], "unknown config key training"),
    (["model.freeze=partial"], "model.freeze: 'partial' is not one of 'head', 'head+last_block', 'full'"),
    (["data.batch_size=0"], "data.batch_size: must be ≥ 1, got 0"),
    (["data.batch_size=3.5"], "data.batch_size: expected int, got 3.5"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["run.test_at_end=maybe"], "run.test_at_end: expected true or false"),
    (["model.name=not_a_model_xyz"], "model.name: 'not_a_model_xyz' is not a timm model"),
    (["model.weights=/no/such.safetensors"], "model.weights: /no/such.safetensors not found"),
    (["run.resume=sometimes"],
     "run.resume: 'sometimes' is neither never, auto, restart nor a checkpoint directory"),
    (["optim.ema=1.5"], "optim.ema: expected a decay in (0, 1)"),
    (["model.layer_decay_mode=blocks"], "model.layer_decay_mode: 'blocks' is not one of 'group', 'depth'"),
    (["run.metric=acuroc"], "run.metric: 'acuroc' is not one of auroc_macro"),
    (["model.name=swin_tiny_patch4_window7_224", "data.image_size=300"],
     "data.image_size: swin_tiny_patch4_window7_224 needs a multiple of 32"),
    (["data.global_batch=0"], "data.global_batch: must be ≥ 1, got 0"),
    (["lr"], "override 'lr': expected key.sub=value"),
    (["data.shards.x=1"], "data.shards"),
])
def test_mistakes_are_one_line(chexpert_shards: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"data.shards={chexpert_shards}", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_shards_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"manifest\.json not found"):
        load_config(DEMO, [f"data.shards={tmp_path}"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


SHIPPED = sorted(DEMO.parent.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(DEMO.parent).as_posix() for p in SHIPPED])
def test_every_shipped_config_is_valid(path: Path, chexpert_shards: Path, pneumonia_shards: Path) -> None:
    shards = pneumonia_shards if "pneumonia" in str(path) else chexpert_shards
    config = load_config(path, [f"data.shards={shards}"])
    assert config.model.name and config.run.dir.startswith("runs/")
