"""The typed training log shared by the trainer and the report: round trip, on-disk keys, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.training_log import EpochRecord, append_epoch, read_training_log

REPO_ROOT = Path(__file__).resolve().parents[1]


def _record(epoch: int) -> EpochRecord:
    metrics = {
        f"val_{d}_{m}": float(epoch) for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")
    }
    return EpochRecord(
        epoch=epoch,
        lr=1e-3,
        train_loss=10.0 / epoch,
        steps=4,
        epoch_time_s=0.5,
        pairs_per_s=80.0,
        **metrics,
        val_rsum=6.0 * epoch,
        val_time_s=0.01,
        val_images=10,
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [_record(epoch) for epoch in (1, 2, 3)]
    for record in records:
        append_epoch(log, record)
    assert read_training_log(log) == records
    line = json.loads(log.read_text().splitlines()[0])
    assert list(line) == sorted(line) and line["val_rsum"] == 6.0 and line["epoch"] == 1


def test_append_drops_epochs_left_by_an_interrupted_run(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    for epoch in (1, 2, 3):
        append_epoch(log, _record(epoch))
    append_epoch(log, _record(2))  # resumed after epoch 1
    assert [record.epoch for record in read_training_log(log)] == [1, 2]


def test_committed_sample_log_is_read() -> None:
    """The sample run's committed log (and so dvc plots and the CI baseline) keeps its keys."""
    log = REPO_ROOT / "results" / "train" / "metrics.jsonl"
    if not log.is_file():
        pytest.skip("no committed sample training log")
    records = read_training_log(log)
    assert records and [r.epoch for r in records] == list(range(1, len(records) + 1))
    first = json.loads(log.read_text().splitlines()[0])
    assert records[0].to_json_line() == json.dumps(first, sort_keys=True) + "\n"


def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    missing_key = {k: v for k, v in _record(2).model_dump().items() if k != "val_rsum"}
    log.write_text(_record(1).to_json_line() + json.dumps(missing_key) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not an epoch record \(val_rsum: Field required"):
        read_training_log(log)
    log.write_text(_record(1).to_json_line() + "\n{oops\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:3: not a JSON line"):
        read_training_log(log)
    with pytest.raises(UserError, match="training log not found"):
        read_training_log(tmp_path / "absent.jsonl")
    assert read_training_log(tmp_path / "absent.jsonl", missing_ok=True) == []
