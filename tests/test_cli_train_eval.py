"""`scan-pipe train` and `scan-pipe evaluate` end to end on a tiny synthetic store, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import SyntheticDataset, make_synthetic_dataset
from typer.testing import CliRunner

from pipeline.metrics import METRIC_KEYS
from pipeline.vocab import build_vocabulary
from stages.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("cli"),
        splits={"train": 30, "val": 10, "test": 20},
        img_dim=16,
        num_concepts=10,
    )


def _invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes else "")


def _train_args(data: SyntheticDataset, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--features", data.features_dir,
        "--train-captions", data.captions["train"],
        "--val-captions", data.captions["val"],
        "--vocab", data.vocab_path,
        "--out", out,
        "--batch-size", "16", "--embed-size", "16", "--word-dim", "8",
        "--device", "cpu", "--cache-dir", data.root / "cache", "--no-progress",
        *extra,
    ]  # fmt: skip


def _evaluate_args(data: SyntheticDataset, checkpoints: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["evaluate"]
    for checkpoint in checkpoints:
        args += ["--checkpoint", checkpoint]
    return [
        *args,
        "--features", data.features_dir,
        "--captions", data.captions["test"],
        "--out", out,
        "--device", "cpu", "--cache-dir", data.root / "cache", "--no-progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(data: SyntheticDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    params = root / "params.yaml"
    params.write_text("train:\n  epochs: 1\n  lr: 0.002\n  val_max_images: 8\n")
    result, output = _invoke(_train_args(data, root / "t2i", "--params", params, "--epochs", "2"))
    assert result.exit_code == 0, output
    result, output = _invoke(_train_args(data, root / "i2t", "--params", params, "--model", "scan_i2t_avg"))
    assert result.exit_code == 0, output
    return {"t2i": root / "t2i", "i2t": root / "i2t"}


def test_train_writes_checkpoints_and_metrics_log(runs: dict[str, Path]) -> None:
    log = [json.loads(line) for line in (runs["t2i"] / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1, 2]  # --epochs overrides the params file
    assert log[0]["lr"] == pytest.approx(0.002) and log[0]["val_images"] == 8  # the file's other keys apply
    for key in ("train_loss", "epoch_time_s", "val_time_s", *(f"val_{k}" for k in METRIC_KEYS)):
        assert key in log[0]
    for which in ("last", "best"):
        folder = runs["t2i"] / "checkpoints" / which
        assert {"model.safetensors", "checkpoint.json", "vocab.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((runs["t2i"] / "checkpoints/last/checkpoint.json").read_text())["epoch"] == 2


def test_evaluate_single_and_ensemble(data: SyntheticDataset, runs: dict[str, Path], tmp_path: Path) -> None:
    singles = {}
    for name in ("t2i", "i2t"):
        result, output = _invoke(
            _evaluate_args(
                data, [runs[name] / "checkpoints/last"], tmp_path / name, "--protocol", "all", "--save-scores"
            )
        )
        assert result.exit_code == 0, output
        assert "rsum" in output
        singles[name] = np.load(tmp_path / name / "scores.npy")
        assert singles[name].shape == (20, 100)
    metrics = json.loads((tmp_path / "t2i" / "metrics.json").read_text())
    assert all(key in metrics for key in METRIC_KEYS) and metrics["num_images"] == 20
    assert len(metrics["coco_1k"]["folds"]) == 5 and metrics["coco_1k"]["images_per_fold"] == 4
    ranks = pq.read_table(tmp_path / "t2i" / "ranks.parquet")
    assert ranks.num_rows == 20 + 100
    assert set(ranks.column("query_type").to_pylist()) == {"i2t", "t2i"}

    checkpoints = [runs["t2i"] / "checkpoints/last", runs["i2t"] / "checkpoints/last"]
    result, output = _invoke(
        _evaluate_args(
            data,
            checkpoints,
            tmp_path / "ens",
            "--save-scores",
            "--model",
            "scan_t2i_avg",
            "--model",
            "scan_i2t_avg",
        )
    )
    assert result.exit_code == 0, output
    ensemble = np.load(tmp_path / "ens" / "scores.npy")
    np.testing.assert_allclose(ensemble, (singles["t2i"] + singles["i2t"]) / 2, rtol=0, atol=1e-6)
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["models"] == ["scan_t2i_avg", "scan_i2t_avg"] and metrics["protocol"] == "flickr30k_1k"


def test_evaluate_errors_name_the_culprit(
    data: SyntheticDataset, runs: dict[str, Path], tmp_path: Path
) -> None:
    last = runs["t2i"] / "checkpoints/last"
    result, output = _invoke(_evaluate_args(data, [last], tmp_path / "a", "--model", "scan_i2t_lse"))
    assert result.exit_code == 1 and "scan_t2i_avg" in output and "scan_i2t_lse" in output

    result, output = _invoke(_evaluate_args(data, [tmp_path / "missing"], tmp_path / "b"))
    assert result.exit_code == 1 and "missing" in output and "not found" in output

    other_vocab = build_vocabulary(["just three words"], min_count=1).save(tmp_path / "vocab.json")
    result, output = _invoke(_evaluate_args(data, [last], tmp_path / "c", "--vocab", other_vocab))
    assert result.exit_code == 1 and "vocab.json" in output and "trained with" in output

    from pipeline.captions import write_captions

    orphan = tmp_path / "orphan.parquet"
    write_captions(orphan, ["ghost.jpg"] * 5, ["a dog"] * 5)
    args = _evaluate_args(data, [last], tmp_path / "d")
    args[args.index("--captions") + 1] = orphan
    result, output = _invoke(args)
    assert result.exit_code == 1 and "orphan.parquet" in output and "ghost.jpg" in output

    result, output = _invoke(_evaluate_args(data, [last], tmp_path / "e", "--protocol", "coco_9k"))
    assert result.exit_code == 2 and "protocol" in output


def test_train_errors_name_the_culprit(data: SyntheticDataset, tmp_path: Path) -> None:
    result, output = _invoke(_train_args(data, tmp_path / "fresh", "--resume"))
    assert result.exit_code == 1 and "no checkpoint to resume" in output

    bad_params = tmp_path / "params.yaml"
    bad_params.write_text("train:\n  lamda_softmax: 3\n")
    result, output = _invoke(_train_args(data, tmp_path / "x", "--params", bad_params))
    assert result.exit_code == 2 and "lamda_softmax" in output

    args = _train_args(data, tmp_path / "y")
    args[args.index("--vocab") + 1] = tmp_path / "nope.json"
    result, output = _invoke(args)
    assert result.exit_code == 1 and "nope.json" in output


def test_every_params_key_can_be_set_on_the_command_line(data: SyntheticDataset, tmp_path: Path) -> None:
    """`--set` reaches model options (validated by the model's config) and schedule keys alike."""
    result, output = _invoke(_train_args(data, tmp_path / "a", "--set", "lambda_softmax=-1"))
    assert result.exit_code == 2 and "lambda_softmax" in output and "greater than 0" in output
    result, output = _invoke(_train_args(data, tmp_path / "b", "--set", "train.raw_feature_norm=l3norm"))
    assert result.exit_code == 2 and "l3norm" in output
    result, output = _invoke(_train_args(data, tmp_path / "c", "--set", "lr_updat=3"))
    assert result.exit_code == 2 and "--set train.lr_updat" in output
    result, output = _invoke(_train_args(data, tmp_path / "d", "--set", "epochs"))
    assert result.exit_code == 2 and "KEY=VALUE" in output
