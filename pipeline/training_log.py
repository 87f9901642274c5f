"""The training log, `metrics.jsonl`: one typed record per epoch, written by the trainer, read by the report.

The keys on disk are the record's field names, one flat JSON object per line with sorted keys: `dvc plots`
(through the report's CSV), the committed sample run and the CI baseline read them, so renaming a field
changes the file format.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.atomic import write_text_atomic
from pipeline.errors import UserError


class TrainingLogError(UserError):
    """A line of `metrics.jsonl` is not an epoch record; the message names the file and line."""


class EpochRecord(BaseModel):
    """One completed epoch: the optimisation (loss, lr, throughput) and the validation that followed it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: int  # completed epochs, 1-based
    lr: float
    train_loss: float  # mean over the epoch's steps of the batch-summed triplet loss, averaged over ranks
    steps: int
    epoch_time_s: float
    pairs_per_s: float
    val_i2t_r1: float
    val_i2t_r5: float
    val_i2t_r10: float
    val_i2t_medr: float
    val_i2t_meanr: float
    val_t2i_r1: float
    val_t2i_r5: float
    val_t2i_r10: float
    val_t2i_medr: float
    val_t2i_meanr: float
    val_rsum: float
    val_time_s: float
    val_images: int

    def to_json_line(self) -> str:
        """The record as one line of the log (sorted keys, newline included)."""
        return json.dumps(self.model_dump(), sort_keys=True) + "\n"


def read_training_log(path: str | Path, *, missing_ok: bool = False) -> list[EpochRecord]:
    """The records of a log in file order; a missing file is an error unless `missing_ok` (then empty)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise TrainingLogError(f"{path}: training log not found")
    records: list[EpochRecord] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(EpochRecord.model_validate(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise TrainingLogError(f"{path}:{number}: not a JSON line: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in item['loc']) or 'line'}: {item['msg']}"
                for item in exc.errors()
            )
            raise TrainingLogError(f"{path}:{number}: not an epoch record ({problems})") from exc
    return records


def append_epoch(path: str | Path, record: EpochRecord) -> None:
    """Make `record` the log's last line, dropping lines of its epoch or later (left by an interrupted run).

    The whole file is rewritten atomically (it is small), so a reader never sees half a line.
    """
    kept = [r for r in read_training_log(path, missing_ok=True) if r.epoch < record.epoch]
    write_text_atomic(path, "".join(r.to_json_line() for r in [*kept, record]))
