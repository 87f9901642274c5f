"""What a comparison produces (rows, a verdict), and the one error for inputs that cannot be compared."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import UserError

Status = Literal["ok", "improved", "REGRESSION", "MISSING", "new", "info", "CHANGED"]
FAILING_STATUSES: frozenset[str] = frozenset({"REGRESSION", "MISSING", "CHANGED"})


class CompareError(UserError):
    """An input cannot be read or the two inputs cannot be compared; the message names the file."""


@dataclass
class ComparisonRow:
    """One line of the comparison table."""

    name: str
    baseline: float | str | None
    new: float | str | None
    delta: float | None
    tolerance: str
    status: Status
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in FAILING_STATUSES


@dataclass
class ComparisonResult:
    """All rows of one comparison, plus what was compared (for the table title and JSON output)."""

    kind: Literal["metrics", "features"]
    baseline: str
    new: str
    tolerance_source: str
    rows: list[ComparisonRow] = field(default_factory=list)

    @property
    def regressions(self) -> list[ComparisonRow]:
        return [row for row in self.rows if row.failed]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN written as null so the output stays strict JSON)."""

        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and math.isnan(value) else value

        return {
            "kind": self.kind,
            "baseline": self.baseline,
            "new": self.new,
            "tolerance_source": self.tolerance_source,
            "passed": self.passed,
            "regressions": [row.name for row in self.regressions],
            "rows": [{k: clean(v) for k, v in asdict(row).items()} for row in self.rows],
        }


def read_json(path: Path) -> Any:
    """Parse a JSON input; an unreadable or malformed file is a CompareError naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CompareError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CompareError(f"{path}: not valid JSON: {exc}") from exc
