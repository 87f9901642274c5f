"""Fine-tuning an imported official run: `train --init` starts from its weights, vocabulary and tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.checkpoint import load_checkpoint, read_checkpoint_info
from pipeline.official_import import import_official
from pipeline.params import TrainParams
from pipeline.precomp import import_precomp
from pipeline.train import train
from pipeline.vocab import OFFICIAL_TOKENIZER
from stages.cli import app

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def official_run(scan_official_fixtures: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture's train split as a store + captions, and its first zip checkpoint imported."""
    root = tmp_path_factory.mktemp("finetune")
    (data_dir,) = sorted(path for path in (scan_official_fixtures / "data").iterdir() if path.is_dir())
    store = import_precomp(data_dir, "train", root / "train", progress=False)
    runs = sorted(p.parent for p in (scan_official_fixtures / "runs").glob("*/model_best.pth.tar"))
    checkpoint = next(run for run in runs if not run.name.endswith("_legacy")) / "model_best.pth.tar"
    (vocab,) = sorted((scan_official_fixtures / "vocab").glob("*_vocab.json"))
    imported = import_official(checkpoint, vocab, root / "imported").out_dir
    return {
        "features": store.store_dir,
        "captions": store.captions_path,
        "imported": imported,
        "vocab": vocab,
    }


def _params(init: Path, **changes: object) -> TrainParams:
    settings = {"init": str(init), "epochs": 1, "batch_size": 16, "lr": 1e-12, "device": "cpu", "amp": False}
    return TrainParams(**{**settings, **changes})


def test_finetune_starts_from_the_imported_weights(official_run: dict[str, Path], tmp_path: Path) -> None:
    # train.model and the sample's sizes differ from the checkpoint: the checkpoint's architecture wins
    params = _params(official_run["imported"], model="scan_i2t_avg", embed_size=64)
    result = train(
        params,
        features_dir=official_run["features"],
        train_captions=official_run["captions"],
        val_captions=official_run["captions"],
        vocab_path=None,
        out_dir=tmp_path / "run",
        progress=False,
    )
    assert result.epochs_completed == 1
    imported_model, imported_info = load_checkpoint(official_run["imported"])
    tuned_model, tuned_info = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert tuned_info.model_name == imported_info.model_name
    assert tuned_info.model_config == imported_info.model_config
    assert tuned_info.tokenizer == OFFICIAL_TOKENIZER
    assert tuned_info.vocab_path is not None
    assert tuned_info.vocab_path.read_bytes() == official_run["vocab"].read_bytes()
    assert tuned_info.has_optimizer  # a fresh Adam, saved after the first epoch
    moved = max(
        float((tuned - start).abs().max())
        for tuned, start in zip(
            tuned_model.state_dict().values(), imported_model.state_dict().values(), strict=True
        )
    )
    assert moved < 1e-9  # lr 1e-12: the run started from the imported weights, not from a fresh draw
    assert moved > 0  # ... and it did train

    # resuming the fine-tune keeps the official vocabulary and tokenizer
    resumed = train(
        params.model_copy(update={"epochs": 2}),
        features_dir=official_run["features"],
        train_captions=official_run["captions"],
        val_captions=official_run["captions"],
        vocab_path=None,
        out_dir=tmp_path / "run",
        resume=True,
        progress=False,
    )
    assert resumed.start_epoch == 1 and resumed.epochs_completed == 2
    assert read_checkpoint_info(tmp_path / "run" / "checkpoints" / "last").tokenizer == OFFICIAL_TOKENIZER


def test_finetune_through_params_yaml(official_run: dict[str, Path], tmp_path: Path) -> None:
    """The DVC route: `train.init` in params.yaml, no --vocab (the stage passes one anyway; it is ignored)."""
    params_file = tmp_path / "params.yaml"
    section = _params(official_run["imported"]).model_dump(mode="json")
    params_file.write_text(yaml.safe_dump({"train": section}))
    args = [
        "train",
        "--params",
        str(params_file),
        "--features",
        str(official_run["features"]),
        "--train-captions",
        str(official_run["captions"]),
        "--val-captions",
        str(official_run["captions"]),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    info = read_checkpoint_info(tmp_path / "run" / "checkpoints" / "best")
    assert info.tokenizer == OFFICIAL_TOKENIZER
    assert info.train_params is not None and info.train_params["init"] == str(official_run["imported"])


def test_finetune_refusals(official_run: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.init"):
        train(
            _params(tmp_path / "missing"),
            features_dir=official_run["features"],
            train_captions=official_run["captions"],
            val_captions=official_run["captions"],
            vocab_path=None,
            out_dir=tmp_path / "run",
            progress=False,
        )
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--features",
            str(official_run["features"]),
            "--train-captions",
            str(official_run["captions"]),
            "--val-captions",
            str(official_run["captions"]),
            "--out",
            str(tmp_path / "run2"),
        ],
    )
    assert result.exit_code != 0
    assert "--vocab is required" in result.output
