"""External validation (`python -m trainer.evaluate`) and its table in the report.

The trained demo CNN (the session's `cnn_run`, copied: it is shared read-only) is scored on a pack
in another vocabulary: the session's CheXpert test split rewritten with NIH-style names (Pleural
Effusion → Effusion, Lung Opacity → Infiltration), Consolidation and the rest dropped, and some
uncertain, blank and absent labels planted to check the run's policy is what scores them.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from shards.labels import COMPETITION5, NIH_LABELS
from tests.trainer_helpers import DEMO, DEMO_VIT, ROOT, train
from trainer import rundir
from trainer.config import load_config
from trainer.evaluate import EvaluateOptions, evaluate_external, main

RENAME = {"Pleural Effusion": "Effusion", "Lung Opacity": "Infiltration"}
KEEP = ("Atelectasis", "Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Edema", "Pneumonia",
        "Pneumothorax", "No Finding")
"""The CheXpert labels the NIH-style pack keeps (renamed); Consolidation is not among them."""


def nih_style(raw: dict, index: int) -> dict:
    """A sample's raw labels in the renamed vocabulary, with planted values: every 5th sample's
    Edema uncertain, every 7th's Atelectasis blank, every 9th without Cardiomegaly at all."""
    labels = {RENAME.get(name, name): value for name, value in raw.items() if name in KEEP}
    if index % 5 == 0:
        labels["Edema"] = -1
    if index % 7 == 0:
        labels["Atelectasis"] = None
    if index % 9 == 0:
        labels.pop("Cardiomegaly")
    return labels


def renamed_pack(source: Path, out: Path) -> Path:
    """The source pack's test split only, its JSON labels and manifest in the renamed vocabulary."""
    manifest = json.loads((source / "manifest.json").read_text())
    out.mkdir(parents=True)
    index = 0
    for shard in manifest["splits"]["test"]["shards"]:
        with tarfile.open(source / shard["name"]) as reader, tarfile.open(out / shard["name"], "w") as writer:
            for member in reader.getmembers():
                data = reader.extractfile(member).read()
                if member.name.endswith(".json"):
                    meta = json.loads(data)
                    meta["labels"] = nih_style(meta["labels"], index)
                    index += 1
                    data = json.dumps(meta).encode()
                info = tarfile.TarInfo(member.name)
                info.size = len(data)
                writer.addfile(info, io.BytesIO(data))
    names = [RENAME.get(name, name) for name in manifest["label_names"] if name in KEEP]
    assert set(names) <= set(NIH_LABELS)
    test = manifest["splits"]["test"]
    test["prevalence"] = {RENAME.get(k, k): v for k, v in test["prevalence"].items() if k in KEEP}
    manifest |= {"dataset": "nih-style", "label_names": names, "splits": {"test": test}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def nih_pack(learn_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return renamed_pack(learn_shards, tmp_path_factory.mktemp("nih-style") / "nih")


def copy_run(run: Path, out: Path) -> Path:
    """A finished run without its checkpoints and logs (what evaluate and the report read)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(rundir.CHECKPOINTS, rundir.TENSORBOARD))
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.evaluate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)


@pytest.fixture(scope="module")
def evaluated(cnn_run: Path, nih_pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = copy_run(cnn_run, tmp_path_factory.mktemp("evaluated") / "cnn")
    result = cli("--run", str(run), "--shards", str(nih_pack), "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "external:" in result.stdout and "of 4 shared labels" in result.stdout
    return run


def test_every_target_sample_once_shared_labels_only_patients_carried(evaluated: Path,
                                                                      nih_pack: Path) -> None:
    out = evaluated / "external" / "nih"
    info = json.loads((out / "external.json").read_text())
    assert info["labels"] == [{"run": "Atelectasis", "target": "Atelectasis"},
                              {"run": "Cardiomegaly", "target": "Cardiomegaly"},
                              {"run": "Edema", "target": "Edema"},
                              {"run": "Pleural Effusion", "target": "Effusion"}]
    assert info["left_out"] == ["Consolidation"], "listed, never guessed (Consolidation has no counterpart)"
    assert info["policy"]["per_label"] == dict.fromkeys(("Atelectasis", "Cardiomegaly", "Edema", "Effusion"),
                                                        "ignore"), "the demo run's U-Ignore"

    predictions = rundir.read_predictions(out / "predictions_test.npz")
    assert predictions.labels == ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion")
    expected = {}
    for shard in sorted(nih_pack.glob("test-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    expected[meta["key"]] = meta
    assert sorted(predictions.keys.tolist()) == sorted(expected), "every sample (views: all) exactly once"
    assert len(set(predictions.keys.tolist())) == len(predictions.keys)
    assert [expected[k]["patient"] for k in predictions.keys] == predictions.patients.tolist()

    # The run's policy on the target's names: uncertain (U-Ignore) and absent masked, blank a negative.
    for row, key in enumerate(predictions.keys):
        labels = expected[key]["labels"]
        for column, target in enumerate(("Atelectasis", "Cardiomegaly", "Edema", "Effusion")):
            raw = labels.get(target, "absent")
            masked = raw in (-1, "absent")
            assert predictions.masks[row, column] == (0 if masked else 1), (key, target, raw)
            if not masked:
                assert predictions.targets[row, column] == (1 if raw == 1 else 0), (key, target, raw)
    assert predictions.masks.min() == 0, "the planted values are there"


def test_metrics_equal_scikit_learn_on_the_predictions(evaluated: Path) -> None:
    out = evaluated / "external" / "nih"
    predictions = rundir.read_predictions(out / "predictions_test.npz")
    (record,) = rundir.read_records(out)
    assert (record["split"], record["dataset"], record["samples"]) == ("test", "nih", len(predictions.keys))
    values = []
    for column, label in enumerate(predictions.labels):
        keep = predictions.masks[:, column] > 0
        y = predictions.targets[keep, column]
        if y.min() == y.max():
            assert record["auroc"][label] is None
            continue
        value = roc_auc_score(y, predictions.probs[keep, column])
        values.append(value)
        assert record["auroc"][label] == pytest.approx(value, abs=1e-6), label
    assert len(values) >= 3 and record["auroc_macro"] == pytest.approx(np.mean(values))


def test_on_its_own_pack_it_reproduces_the_trainers_test_predictions(cnn_run: Path, learn_shards: Path,
                                                                     tmp_path: Path) -> None:
    """The same vocabulary, the run's own test split: the trainer's preprocessing, so the trainer's
    own test probabilities (and patients) come back."""
    run = copy_run(cnn_run, tmp_path / "cnn")
    out, record = evaluate_external(EvaluateOptions(run, learn_shards, batch_size=32))
    assert out == run / "external" / learn_shards.name
    ours = rundir.read_predictions(out / "predictions_test.npz")
    trainers = rundir.read_predictions(rundir.predictions_path(cnn_run, "test"))
    assert ours.labels == trainers.labels == COMPETITION5
    assert ours.keys.tolist() == trainers.keys.tolist()
    assert ours.patients.tolist() == trainers.patients.tolist()
    np.testing.assert_allclose(ours.probs, trainers.probs, atol=1e-5)
    np.testing.assert_array_equal(ours.masks, trainers.masks)
    test = next(r for r in rundir.read_records(cnn_run) if r["split"] == "test")
    assert record["auroc_macro"] == pytest.approx(test["auroc_macro"], abs=1e-5)


@pytest.mark.slow
def test_validation_scores_the_model_best_holds_on_every_rank(learn_shards: Path, tmp_path: Path) -> None:
    """Two ranks, one epoch: the val predictions the trainer wrote (each rank scoring its share)
    are what best/ (rank 0's weights and BatchNorm statistics) scores on one process. Each rank's
    last training forward updates its own running statistics after DDP's broadcast: scored with
    those, rank 1's share would differ, and a run resumed from rank 0's checkpoint at an epoch end
    would not reproduce the uninterrupted run's validation."""
    run_dir = tmp_path / "run"
    result = train(DEMO, [f"data.shards={learn_shards}", f"run.dir={run_dir}", "optim.epochs=1",
                          "run.test_at_end=false", "data.samples_per_epoch=256"], processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    out, _ = evaluate_external(EvaluateOptions(run_dir, learn_shards, split="val", batch_size=32))
    ours = rundir.read_predictions(out / "predictions_val.npz")
    trainers = rundir.read_predictions(rundir.predictions_path(run_dir, "val"))
    mine, theirs = np.argsort(ours.keys), np.argsort(trainers.keys)
    assert ours.keys[mine].tolist() == trainers.keys[theirs].tolist()
    np.testing.assert_allclose(ours.probs[mine], trainers.probs[theirs], atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(cnn_run: Path, nih_pack: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(cnn_run, tmp_path / "cnn")
    no_best = copy_run(cnn_run, tmp_path / "no-best")
    shutil.rmtree(no_best / "best")
    pneumonia = tmp_path / "pneumonia"  # a pack whose only label the competition-5 run does not predict
    shutil.copytree(nih_pack, pneumonia)
    manifest = json.loads((pneumonia / "manifest.json").read_text())
    (pneumonia / "manifest.json").write_text(json.dumps(manifest | {"label_names": ["Pneumonia"]}))
    cases = [
        (["--run", str(no_best), "--shards", str(nih_pack)], f"error: --run {no_best}: no best/"),
        (["--run", str(run), "--shards", str(nih_pack), "--split", "val"],
         f"error: --split val: {nih_pack}/manifest.json has no such split (it has test)"),
        (["--run", str(run), "--shards", str(pneumonia)],
         f"error: {pneumonia}/manifest.json: label_names share no label with the run's"),
        (["--run", str(run), "--shards", str(tmp_path / "nowhere")],
         f"error: {tmp_path / 'nowhere'}/manifest.json: missing"),
        (["--run", str(run), "--shards", str(nih_pack), "--out", str(run)],
         f"error: --out {run}: a folder that is not an external result"),
    ]
    result = cli(*cases[0][0])  # the exit status of the command itself; the others in this process
    assert result.returncode == 2 and result.stderr.startswith(cases[0][1]), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for args, start in cases[1:]:
        assert main(args) == 2, args
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith(start), stderr
    assert not (run / "external").exists() and not (no_best / "external").exists()
    assert (run / "config.yaml").is_file() and (run / "best" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def vit_run(cnn_run: Path, learn_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT run directory without training: an untrained tiny ViT exported as best/, its internal test
    predictions written by evaluate on its own pack (the run-directory format both share), the
    CNN's records (the report needs a test record; it scores from the predictions)."""
    run = copy_run(cnn_run, tmp_path_factory.mktemp("vit") / "vit")
    shutil.rmtree(run / "best")
    config = load_config(DEMO_VIT, [f"data.shards={learn_shards}", f"run.dir={run}",
                                    "model.kwargs={img_size: 64, patch_size: 8, depth: 2}"])
    from trainer.models import build_model

    torch.manual_seed(0)
    model = build_model(config.model, num_classes=len(COMPETITION5), image_size=config.data.image_size)
    rundir.write_config(run, config)
    rundir.export_best(run, model.state_dict(), config, {"labels": list(COMPETITION5), "family": "vit",
                                                                  "step": 0})
    out, _ = evaluate_external(EvaluateOptions(run, learn_shards, out=run / "internal"))
    shutil.move(out / "predictions_test.npz", rundir.predictions_path(run, "test"))
    shutil.rmtree(out)
    (run / "predictions_val.npz").unlink()
    return run


def test_report_shows_the_external_table_with_cis_drop_and_the_paired_comparison(
        evaluated: Path, vit_run: Path, nih_pack: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy_run(evaluated, runs / "cnn")
    copy_run(vit_run, runs / "vit")
    evaluate_external(EvaluateOptions(runs / "vit", nih_pack))
    broken = runs / "cnn" / "external" / "damaged"
    shutil.copytree(runs / "cnn" / "external" / "nih", broken)
    (broken / "predictions_test.npz").unlink()
    scored = runs / "vit" / "external" / "nih" / "external.json"  # as if best/ changed since it was scored
    scored.write_text(json.dumps(json.loads(scored.read_text()) | {"best_step": -1}))
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "trainer.report", "--runs", str(runs), "--out", str(out),
                             "--resamples", "100"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["name"] for r in summary["runs"]} == {"cnn", "vit"}, "external/ folders are not runs"
    external = summary["external"]
    assert [s["reason"] for s in external["skipped"]] == ["predictions_test.npz missing"]

    results = {(r["run"], r["dataset"]): r for r in external["results"]}
    assert set(results) == {("cnn", "nih"), ("vit", "nih")}
    cnn = results[("cnn", "nih")]
    assert cnn["left_out"] == ["Consolidation"] and cnn["split"] == "test"
    rows = {row["label"]: row for row in cnn["rows"]}
    assert rows["Pleural Effusion"]["target"] == "Effusion" and "macro" in rows
    (record,) = rundir.read_records(runs / "cnn" / "external" / "nih")
    test = next(r for r in rundir.read_records(runs / "cnn") if r["split"] == "test")
    for label in ("Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"):
        row = rows[label]
        assert row["external"]["value"] == pytest.approx(record["auroc"][label], abs=1e-6)
        assert row["internal"]["value"] == pytest.approx(test["auroc"][label], abs=1e-6)
        assert row["drop"] == pytest.approx(row["internal"]["value"] - row["external"]["value"], abs=2e-6)
        for side in ("external", "internal"):
            cell = row[side]
            assert 0 <= cell["ci_low"] < cell["ci_high"] <= 1, (label, side, cell)
    assert rows["macro"]["labels"] == ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"]
    assert not math.isnan(rows["macro"]["drop"])

    (pair,) = external["comparisons"]
    assert (pair["a"], pair["b"], pair["dataset"]) == ("cnn", "vit", "nih") and pair["n"] == cnn["n"]
    assert pair["metric"] == "auroc_macro" and 0 <= pair["p_value"] <= 1 and pair["ci_low"] <= pair["ci_high"]

    markdown = (out / "index.md").read_text()
    assert "## External validation" in markdown and "### CNN vs ViT on each external pack" in markdown
    line = next(x for x in markdown.splitlines() if x.startswith("| cnn | resnet10t | nih (test) | Pleural"))
    assert "Pleural Effusion (= Effusion)" in line and line.count("[") == 2
    assert f"{rows['Pleural Effusion']['drop']:+.3f}" in line
    assert "left out (no same-meaning label in the pack): Consolidation" in markdown
    assert not cnn["stale"] and results[("vit", "nih")]["stale"]
    assert "vit on nih: left out (no same-meaning label in the pack): Consolidation — ⚠ scored best/ of " \
        "step -1" in markdown
    assert "External validation" in (out / "index.html").read_text()


def test_report_without_external_results_has_no_section(cnn_run: Path, tmp_path: Path) -> None:
    from trainer.report.analysis import Settings
    from trainer.report.external import external_validation
    from trainer.report.render import render_markdown
    from trainer.report.runs import load_run

    run = load_run(copy_run(cnn_run, tmp_path / "cnn"), "cnn")
    section = external_validation([run], Settings(resamples=10))
    assert section == {"results": [], "comparisons": [], "skipped": []}
    summary = {"generated": "now", "resamples": 10, "runs": [], "pairs": [], "external": section,
               "figures": [], "missing_figures": [], "anchors": [], "skipped": []}
    assert "External validation" not in render_markdown(summary)


def test_demo_picks_nih_and_mimic_when_known_else_a_chexpert_stand_in(
        cnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m trainer.demo --external`'s targets and its validation step (the training half is
    the plain demo's, tested in test_demo_and_bench)."""
    from shards.errors import DataError
    from trainer import demo_external

    monkeypatch.setattr(demo_external, "known_layouts", lambda: ("chexpert", "pneumonia"))
    (stand_in,) = demo_external.external_targets()
    assert (stand_in.name, stand_in.layout, stand_in.seed) == ("chexpert-seed1", "chexpert", 1)
    assert "stand-in" in stand_in.note
    monkeypatch.setattr(demo_external, "known_layouts", lambda: ("chexpert", "pneumonia", "nih", "mimic"))
    assert [t.name for t in demo_external.external_targets()] == ["nih", "mimic"]
    assert [t.name for t in demo_external.external_targets(["mimic"])] == ["mimic"]
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"^--target nosuch: shards\.synth/shards\.pack here do not know"):
        demo_external.external_targets(["nosuch"])

    run = copy_run(cnn_run, tmp_path / "runs" / "cnn")
    demo_external.validate(tmp_path, [run], [stand_in], patients=24)
    (record,) = rundir.read_records(run / "external" / "chexpert-seed1")
    assert record["dataset"] == "chexpert-seed1" and record["samples"] > 0
    manifest = json.loads((tmp_path / "external" / "chexpert-seed1" / "manifest.json").read_text())
    assert manifest["dataset"] == "chexpert"
