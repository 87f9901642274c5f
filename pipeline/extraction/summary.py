"""What a run did: each rank's counts, merged by rank 0 into `OUT/_summary.json` and `OUT/_errors.jsonl`.

Ranks share no memory, so each writes its result to a hidden rank file in OUT; after a barrier every rank
reads all of them (and so returns the same merged summary), and rank 0 writes the two outputs.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text_atomic

# Run records live beside the parts; the leading `_` makes pyarrow, pandas, Spark and DuckDB globs skip them,
# so a plain reader of the store directory sees only the parts.
ERRORS_FILE = "_errors.jsonl"
SUMMARY_FILE = "_summary.json"


@dataclass
class RankResult:
    """What one rank did; rank 0 merges these into the summary."""

    rank: int
    done: int = 0
    failed: int = 0
    elapsed_s: float = 0.0  # whole run on this rank, model loading included
    extract_s: float = 0.0  # the decode + detect + write loop only: what images/s is measured on
    errors: list[dict[str, str]] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)  # accepted oddities (JPEG without end marker)
    orientation_tagged: int = 0  # extracted images whose EXIF orientation tag is not 1
    num_boxes: dict[str, float] = field(default_factory=dict)
    parts_written: int = 0
    quarantined: list[str] = field(default_factory=list)  # rank 0: unreadable parts it moved aside

    def record_error(self, image_id: str, kind: str, reason: str, exception: str) -> None:
        """Count one failed image and keep the line it gets in _errors.jsonl."""
        self.failed += 1
        self.errors.append(
            {"image_id": image_id, "error_type": kind, "reason": reason, "exception": exception}
        )


@dataclass
class ExtractSummary:
    """The merged outcome of a run, printed and written to `OUT/_summary.json`."""

    total: int
    done: int
    skipped: int
    failed: int
    elapsed_s: float
    extract_s: float
    images_per_s: float
    world_size: int
    device: str
    precision: str
    batch_size: int
    untrained: bool
    weights_sha256: str
    parts_written: int
    conversions: dict[str, int]
    warnings: dict[str, int]  # images extracted despite an oddity, by oddity
    # The EXIF policy ("ignore": stored pixels, as the Caffe reference; "apply": rotated) and how many
    # extracted images carry an orientation tag other than 1 (rotated under "apply", not under "ignore").
    exif: str
    orientation_tagged: int
    num_boxes: dict[str, float]
    errors_file: str
    finished_at: str
    ranks: list[dict[str, Any]]
    quarantined: list[str]  # unreadable parts moved to OUT/_quarantine/ before the run (their images redone)
    resume_message: str  # "resuming: ..." when the run continued an existing store, else ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resume_message(already: int, to_do: int, quarantined: int) -> str:
    """The line a run that continues an existing store starts with."""
    return f"resuming: {already} images already in the store, {to_do} to do ({quarantined} parts quarantined)"


def _rank_file(out: Path, rank: int) -> Path:
    return out / f".extract-rank-{rank}.json"


def write_rank_result(out: Path, result: RankResult) -> None:
    """Leave this rank's result for the others to read after the next barrier."""
    write_text_atomic(_rank_file(out, result.rank), json.dumps(asdict(result), sort_keys=True))


def read_rank_results(out: Path, world_size: int) -> list[RankResult]:
    """Every rank's result (call after a barrier that follows `write_rank_result` on every rank)."""
    return [
        RankResult(**json.loads(_rank_file(out, rank).read_text(encoding="utf-8")))
        for rank in range(world_size)
    ]


def merge_results(
    results: list[RankResult],
    *,
    total: int,
    skipped: int,
    device: str,
    precision: str,
    batch_size: int,
    metadata: dict[str, Any],
    out: Path,
    resuming: bool = False,
    to_do: int | None = None,
) -> ExtractSummary:
    """One summary of all ranks: counts summed, times the slowest rank's, box counts pooled.

    `resuming`: the store already held rows (a run that quarantined parts is resuming too); `to_do`: the
    images not yet in the store when the run started (default `total - skipped`).
    """
    done = sum(r.done for r in results)
    quarantined = sorted(name for r in results for name in r.quarantined)
    resuming = resuming or bool(quarantined)
    extract_s = max(r.extract_s for r in results)
    conversions: dict[str, int] = {}
    for r in results:
        for conversion, count in r.conversions.items():
            conversions[conversion] = conversions.get(conversion, 0) + count
    warnings: dict[str, int] = {}
    for r in results:
        for warning, count in r.warnings.items():
            warnings[warning] = warnings.get(warning, 0) + count
    with_boxes = [r for r in results if r.num_boxes]
    num_boxes: dict[str, float] = {}
    if with_boxes:
        num_boxes = {
            "min": min(r.num_boxes["min"] for r in with_boxes),
            "max": max(r.num_boxes["max"] for r in with_boxes),
            "mean": sum(r.num_boxes["mean"] * r.done for r in with_boxes)
            / max(1, sum(r.done for r in with_boxes)),
        }
    return ExtractSummary(
        total=total,
        done=done,
        skipped=skipped,
        failed=sum(r.failed for r in results),
        elapsed_s=round(max(r.elapsed_s for r in results), 3),
        extract_s=round(extract_s, 3),
        images_per_s=round(done / extract_s, 4) if extract_s > 0 else 0.0,
        world_size=len(results),
        device=device,
        precision=precision,
        batch_size=batch_size,
        untrained=bool(metadata.get("untrained", False)),
        weights_sha256=str(metadata.get("weights_sha256", "")),
        parts_written=sum(r.parts_written for r in results),
        conversions=dict(sorted(conversions.items())),
        warnings=dict(sorted(warnings.items())),
        exif=str(metadata.get("exif", "")),
        orientation_tagged=sum(r.orientation_tagged for r in results),
        num_boxes=num_boxes,
        errors_file=str(out / ERRORS_FILE),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ranks=[
            {"rank": r.rank, "done": r.done, "failed": r.failed, "elapsed_s": round(r.elapsed_s, 3)}
            for r in results
        ],
        quarantined=quarantined,
        resume_message=(
            resume_message(skipped, total - skipped if to_do is None else to_do, len(quarantined))
            if resuming
            else ""
        ),
    )


def write_outputs(out: Path, summary: ExtractSummary, results: list[RankResult]) -> None:
    """_errors.jsonl (sorted by image id; empty when nothing failed) and _summary.json; rank files removed."""
    errors = sorted((e for r in results for e in r.errors), key=lambda e: e["image_id"])
    write_text_atomic(out / ERRORS_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary.to_json(), indent=2, sort_keys=True) + "\n")
    for result in results:
        _rank_file(out, result.rank).unlink(missing_ok=True)
