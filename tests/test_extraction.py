"""The extraction engine in-process: the README's library example on a folder (rows, ids, shapes, errors,
resume), a detector that is not the bottom-up-attention one (the Protocol is all the engine needs), the
store dtypes, and the layering (pipeline never imports extractors; the stage imports torch lazily)."""

from __future__ import annotations

import ast
import io
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.extraction import ERRORS_FILE, SUMMARY_FILE, extract_images
from pipeline.params import ExtractParams
from pipeline.store import FeatureStore, list_parts

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD_IMAGES = ("a.jpg", "b.png", "sub/c.jpg")

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _image_bytes(seed: int, fmt: str, height: int = 60, width: int = 80) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Three good images (one in a subfolder) and a truncated JPEG."""
    root = tmp_path / "images"
    for seed, name in enumerate(GOOD_IMAGES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image_bytes(seed, "PNG" if name.endswith(".png") else "JPEG"))
    (root / "broken.jpg").write_bytes(_image_bytes(9, "JPEG")[:300])
    return root


def readme_extraction_example() -> str:
    """The python block of README.md's "Using the library" section that calls the extraction engine."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using the library", 1)[1].split("\n## ", 1)[0]
    blocks = [
        b for b in re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL) if "extract_images(" in b
    ]
    assert len(blocks) == 1, "README's library section should hold one extraction example"
    return blocks[0]


def run_readme_example(images: Path, out: Path) -> dict[str, Any]:
    """Execute the README example as written, only its two folder names pointed at `images` and `out`."""
    code = readme_extraction_example()
    assert code.count('"images/"') == 1 and code.count('"features/"') == 2
    code = code.replace('"images/"', repr(str(images))).replace('"features/"', repr(str(out)))
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_example_extracts_a_folder_records_failures_and_resumes(
    image_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "features"
    first = run_readme_example(image_dir, out)
    summary, store = first["summary"], first["store"]
    assert (summary.total, summary.done, summary.skipped, summary.failed) == (4, 3, 0, 1)
    assert sorted(store.image_ids) == sorted(GOOD_IMAGES)
    assert store.metadata["untrained"] is True and store.metadata["feature_dtype"] == "float16"
    feature_dim = first["built"].detector.config.feature_dim
    assert store.feature_dim == feature_dim
    for record in store.iter_records():
        assert (record.image_w, record.image_h) == (80, 60)
        assert record.boxes.shape == (36, 4) and record.boxes.dtype == np.float32
        assert record.features.shape == (36, feature_dim) and record.features.dtype == np.float16
        assert record.object_ids.dtype == np.int32 and record.attribute_ids.dtype == np.int32
        assert record.object_conf.dtype == np.float32
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert [(e["image_id"], e["error_type"], e["exception"]) for e in errors] == [
        ("broken.jpg", "truncated", "ImageDecodeError")
    ]
    assert errors[0]["reason"]
    assert json.loads((out / SUMMARY_FILE).read_text())["done"] == 3

    parts = list_parts(out)
    again = run_readme_example(image_dir, out)
    assert (again["summary"].done, again["summary"].skipped, again["summary"].failed) == (0, 3, 1)
    assert list_parts(out) == parts
    assert sorted(again["store"].image_ids) == sorted(GOOD_IMAGES)


@dataclass
class ToyRegions:
    """Detector output in the detector's own dtypes (float64 boxes, int64 ids), as a detector may give it."""

    boxes: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attribute_ids: np.ndarray | None = None
    attribute_conf: np.ndarray | None = None


class ToyDetector:
    """Two regions per image from its mean colour; refuses images narrower than 70 px; fails on red ones."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.batches: list[int] = []

    def to(self, device: torch.device) -> ToyDetector:
        self.device = device
        return self

    def detect(self, images_bgr: Sequence[np.ndarray], *, precision: str) -> list[ToyRegions]:
        self.batches.append(len(images_bgr))
        if any(image[..., 2].mean() > 200 for image in images_bgr):
            raise RuntimeError("cannot handle red")
        out = []
        for image in images_bgr:
            height, width = image.shape[:2]
            mean = image.reshape(-1, 3).mean(axis=0)
            out.append(
                ToyRegions(
                    boxes=np.array([[0, 0, width - 1, height - 1], [1, 1, 5, 5]], dtype=np.float64),
                    features=np.stack([mean, mean / 2]).astype(np.float32),
                    object_ids=np.array([3, 7], dtype=np.int64),
                    object_conf=np.array([0.9, 0.1]),
                )
            )
        return out

    def image_size_problem(self, height: int, width: int) -> str | None:
        return f"{width} px is too narrow" if width < 70 else None


def test_any_detector_of_the_protocol_and_one_dtype_convention(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_image_bytes(1, "PNG"))
    (images / "narrow.png").write_bytes(_image_bytes(2, "PNG", width=40))
    red = np.zeros((60, 80, 3), dtype=np.uint8)
    red[..., 0] = 255  # RGB red: the BGR array's channel 2
    buffer = io.BytesIO()
    Image.fromarray(red).save(buffer, "PNG")
    (images / "red.png").write_bytes(buffer.getvalue())
    detector = ToyDetector()
    settings = ExtractParams(batch_size=3, num_workers=0, feature_dtype="float32", device="auto")
    summary = extract_images(detector, images, tmp_path / "out", settings, metadata={"extractor": "toy"})
    assert (summary.done, summary.failed) == (1, 2)
    assert detector.batches == [2, 1, 1]  # the failing batch of two is retried image by image
    errors = {
        e["image_id"]: e for e in map(json.loads, (tmp_path / "out" / ERRORS_FILE).read_text().splitlines())
    }
    assert (
        errors["narrow.png"]["error_type"] == "unsupported" and "too narrow" in errors["narrow.png"]["reason"]
    )
    assert errors["red.png"] == {
        "image_id": "red.png",
        "error_type": "detector_failed",
        "reason": "RuntimeError: cannot handle red",
        "exception": "RuntimeError",
    }
    store = FeatureStore(tmp_path / "out")
    (record,) = store.iter_records()
    assert record.boxes.dtype == np.float32 and record.object_ids.dtype == np.int32
    assert record.object_conf.dtype == np.float32 and record.attribute_ids is None
    np.testing.assert_array_equal(record.object_ids, [3, 7])
    assert store.metadata["extractor"] == "toy" and store.metadata["precision"] == "exact"


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at a file's top level (not in functions, not under `if TYPE_CHECKING:`)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _all_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_engine_knows_no_detector_and_the_stage_imports_torch_lazily() -> None:
    for path in sorted((REPO_ROOT / "pipeline" / "extraction").glob("*.py")):
        assert not any(name.split(".")[0] == "extractors" for name in _all_imports(path)), path
    allowed_roots = {"typer", "rich"}
    allowed_project = {"stages._shell", "pipeline.params", "pipeline.errors"}
    for name in _top_level_imports(REPO_ROOT / "stages" / "extract.py"):
        root = name.split(".")[0]
        assert name in allowed_project or root in allowed_roots or root in sys.stdlib_module_names, name
