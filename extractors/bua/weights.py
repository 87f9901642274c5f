"""Reading the published detector checkpoints safely, mapping them onto the model, and digests.

Canonical layout = the HF `unc-nlp/frcnn-vg-finetuned` state dict (detectron2-style names, background in the
LAST class row, 12 sigmoid objectness logits, `proposal_generator.anchor_generator.cell_anchors.0` stored).
Accepted inputs: the HF `pytorch_model.bin` (torch.load with weights_only=True), the converted
`faster_rcnn_from_caffe_attr.pkl` (pickle of {"model": {name: ndarray}}, read with an unpickler that admits
only containers and numpy arrays) and `.safetensors`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from extractors.bua.anchors import anchors_match, generate_cell_anchors
from extractors.bua.config import DetectorConfig

WEIGHTS_NOT_GIVEN_MESSAGE = (
    "No detector weights given. The published bottom-up-attention weights (Visual Genome, 1600 objects / "
    "400 attributes) are the Hugging Face model unc-nlp/frcnn-vg-finetuned, file pytorch_model.bin "
    "(https://huggingface.co/unc-nlp/frcnn-vg-finetuned), or the converted faster_rcnn_from_caffe_attr.pkl "
    "of the detectron2 bottom-up-attention port. Download one, pass it with --weights FILE (optionally "
    "convert it once with `scan-pipe weights convert IN OUT.safetensors`), or pass --weights random for an "
    "untrained detector (sample data only)."
)

ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
_OBJECTNESS = "proposal_generator.rpn_head.objectness_logits"
_CLS_SCORE = "roi_heads.box_predictor.cls_score"
_BBOX_PRED = "roi_heads.box_predictor.bbox_pred"
_CLS_EMBED = "roi_heads.box_predictor.cls_embedding.weight"
_ATTR_SCORE = "roi_heads.box_predictor.attr_score"
_STRIPPABLE_PREFIXES = ("module.", "model.", "detector.")

CheckpointFormat = Literal["torch", "pickle", "safetensors"]


class WeightsError(ValueError):
    """A checkpoint cannot be read or does not fit the detector; the message names the file and/or key."""


# -------------------------------------------------------------------------------------------------- digests
def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (recorded in extraction metadata)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(state: Mapping[str, np.ndarray | torch.Tensor]) -> str:
    """SHA-256 of every tensor's raw little-endian C-order bytes, concatenated in the mapping's order."""
    digest = hashlib.sha256()
    for value in state.values():
        array = _to_numpy(value)
        digest.update(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes())
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------------- reading
_PICKLE_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
        ("collections", "OrderedDict"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits plain containers and numpy arrays; any other global is refused before it can be called."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise WeightsError(
                f"{self.source}: refusing to unpickle global '{module}.{name}': a weights pickle may contain "
                "only dicts, lists and numpy arrays (this file could run code when loaded)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise WeightsError(f"{self.source}: refusing a pickle with persistent ids (not a plain numpy pickle)")


def detect_format(path: str | Path) -> CheckpointFormat:
    """Checkpoint format from the extension, or from the leading bytes when the extension says nothing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pkl", ".pickle"):
        return "pickle"
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return "torch"
    with open(path, "rb") as handle:
        head = handle.read(16)
    if zipfile.is_zipfile(path):
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    raise WeightsError(f"{path}: unknown checkpoint format (expected .bin/.pth, .pkl or .safetensors)")


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """The state dict inside {"model": ...} / {"state_dict": ...} wrappers."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    for wrapper in ("model", "state_dict", "model_state_dict"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return obj


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray | torch.Tensor]:
    """All array entries of a checkpoint file, names as stored; non-array entries (metadata) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    fmt = detect_format(path)
    source = str(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            raw: Mapping[str, Any] = load_file(str(path))
        elif fmt == "pickle":
            with open(path, "rb") as handle:
                raw = _unwrap(_ArrayOnlyUnpickler(handle, source).load(), source)
        else:
            raw = _unwrap(torch.load(path, map_location="cpu", weights_only=True), source)
    except WeightsError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise WeightsError(f"{path}: cannot read {fmt} checkpoint: {exc}") from exc
    state: dict[str, np.ndarray | torch.Tensor] = {}
    for key, value in raw.items():
        if isinstance(value, torch.Tensor | np.ndarray):
            if isinstance(value, np.ndarray) and value.dtype.kind not in "fiub":
                raise WeightsError(f"{path}: key {key!r} holds a {value.dtype} array, expected numbers")
            state[str(key)] = value
    if not state:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    return state


def _to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# -------------------------------------------------------------------------------------------------- mapping
@dataclass
class WeightsReport:
    """What `canonicalize` / `load_into` found and changed; `anchors_match` is None when none were stored."""

    num_keys: int = 0
    unexpected_keys: list[str] = field(default_factory=list)
    filled_keys: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)
    anchors_match: bool | None = None
    anchors_max_diff: float | None = None
    sha256: str | None = None

    def summary(self) -> str:
        parts = [f"{self.num_keys} tensors"]
        if self.conversions:
            parts.append("converted: " + "; ".join(self.conversions))
        if self.filled_keys:
            parts.append(f"{len(self.filled_keys)} num_batches_tracked filled with 0")
        if self.unexpected_keys:
            parts.append(
                f"{len(self.unexpected_keys)} unexpected keys ignored: {', '.join(self.unexpected_keys[:5])}"
            )
        if self.anchors_match is False:
            parts.append(
                f"stored anchors differ from Caffe's (max diff {self.anchors_max_diff:g}); Caffe's are used"
            )
        return ", ".join(parts)


def expected_shapes(config: DetectorConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Canonical key -> shape for a configuration, in HF state-dict order (anchors before the RPN head)."""
    from extractors.bua.detector import BottomUpAttentionDetector

    config = config if config is not None else DetectorConfig()
    with torch.device("meta"):
        model = BottomUpAttentionDetector(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("proposal_generator.") and ANCHORS_KEY not in shapes:
            shapes[ANCHORS_KEY] = (config.num_anchors, 4)
        shapes[key] = tuple(tensor.shape)
    return shapes


def _strip_prefix(state: dict[str, np.ndarray], known: set[str]) -> tuple[dict[str, np.ndarray], str | None]:
    if any(key in known for key in state):
        return state, None
    for prefix in _STRIPPABLE_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}, prefix
    return state, None


def canonicalize(
    raw: Mapping[str, np.ndarray | torch.Tensor],
    config: DetectorConfig | None = None,
    *,
    background: Literal["auto", "first", "last"] = "auto",
    source: str = "checkpoint",
) -> tuple[dict[str, np.ndarray], WeightsReport]:
    """Map a checkpoint onto the canonical layout of `config`, validating every key and shape.

    Handles a leading "model."/"module." prefix, a 24-channel Caffe softmax objectness head (W_fg - W_bg),
    background-first class rows (Caffe order; "auto" infers it from a 4*(C+1)-row bbox_pred), and
    num_batches_tracked of shape [] or [1] (missing ones are filled with 0).
    """
    config = config if config is not None else DetectorConfig()
    shapes = expected_shapes(config)
    report = WeightsReport()
    state = {key: _to_numpy(value) for key, value in raw.items()}
    state, prefix = _strip_prefix(state, set(shapes))
    if prefix:
        report.conversions.append(f"stripped prefix {prefix!r}")

    num_anchors = config.num_anchors
    for suffix in (".weight", ".bias"):
        key = _OBJECTNESS + suffix
        if key in state and state[key].shape[0] == 2 * num_anchors:
            softmax = state[key]
            state[key] = (softmax[num_anchors:] - softmax[:num_anchors]).astype(softmax.dtype)
            if suffix == ".weight":
                report.conversions.append("24-channel softmax objectness -> sigmoid logits (W_fg - W_bg)")

    num_classes = config.num_classes
    bbox_key = _BBOX_PRED + ".weight"
    bbox_rows = state[bbox_key].shape[0] if bbox_key in state else None
    if background == "auto":
        background = "first" if bbox_rows == 4 * (num_classes + 1) else "last"
    if background == "first":
        for key in (
            _CLS_SCORE + ".weight",
            _CLS_SCORE + ".bias",
            _CLS_EMBED,
            _ATTR_SCORE + ".weight",
            _ATTR_SCORE + ".bias",
        ):
            if key in state and state[key].ndim >= 1:
                state[key] = np.concatenate((state[key][1:], state[key][:1]))
        report.conversions.append("background-first class/attribute rows moved to the last row")
    if bbox_rows == 4 * (num_classes + 1):
        drop = slice(4, None) if background == "first" else slice(None, -4)
        for suffix in (".weight", ".bias"):
            if _BBOX_PRED + suffix in state:
                state[_BBOX_PRED + suffix] = state[_BBOX_PRED + suffix][drop]
        report.conversions.append("background rows of bbox_pred dropped")

    generated_anchors = generate_cell_anchors(
        config.anchor_base_size, config.anchor_ratios, config.anchor_scales
    )
    out: dict[str, np.ndarray] = {}
    missing = []
    for key, shape in shapes.items():
        value = state.get(key)
        if key.endswith("num_batches_tracked"):
            if value is None:
                report.filled_keys.append(key)
                value = np.zeros((), dtype=np.int64)
            if value.size != 1:
                raise WeightsError(f"{source}: key {key!r} has shape {list(value.shape)}, expected [] or [1]")
            out[key] = np.asarray(value, dtype=np.int64).reshape(())
            continue
        if key == ANCHORS_KEY:
            if value is None:
                out[key] = generated_anchors
                continue
            match, diff = anchors_match(value, generated_anchors)
            report.anchors_match, report.anchors_max_diff = match, diff
            out[key] = np.asarray(value, dtype=np.float32)
            continue
        if value is None:
            missing.append(key)
            continue
        if tuple(value.shape) != shape:
            raise WeightsError(f"{source}: key {key!r} has shape {list(value.shape)}, expected {list(shape)}")
        if value.dtype.kind != "f":
            raise WeightsError(f"{source}: key {key!r} has dtype {value.dtype}, expected floating point")
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    if missing:
        listed = ", ".join(repr(key) for key in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise WeightsError(f"{source}: missing key {listed}{more} ({len(missing)} of {len(shapes)} missing)")
    report.unexpected_keys = sorted(key for key in state if key not in shapes)
    report.num_keys = len(out)
    return out, report


def load_into(
    detector: torch.nn.Module,
    state: Mapping[str, np.ndarray | torch.Tensor],
    *,
    background: Literal["auto", "first", "last"] = "auto",
    source: str = "checkpoint",
) -> WeightsReport:
    """Validate, map and copy a checkpoint into `detector`; warns when stored anchors differ from Caffe's."""
    canonical, report = canonicalize(state, detector.config, background=background, source=source)
    tensors = {key: torch.from_numpy(value) for key, value in canonical.items() if key != ANCHORS_KEY}
    detector.load_state_dict(tensors, strict=True)
    if report.anchors_match is False:
        warnings.warn(
            f"{source}: stored cell anchors differ from the Caffe anchors of the configuration "
            f"(max abs diff {report.anchors_max_diff:g}); the Caffe anchors are used",
            stacklevel=2,
        )
    return report


def load_weights(detector: torch.nn.Module, path: str | Path) -> WeightsReport:
    """`read_checkpoint` + `load_into` + the file's sha256 in the report."""
    report = load_into(detector, read_checkpoint(path), source=str(path))
    report.sha256 = file_sha256(path)
    return report


# -------------------------------------------------------------------------------------------------- writing
def write_safetensors(
    state: Mapping[str, np.ndarray | torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomic .safetensors write (temporary file in the same folder, then os.replace)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {key: np.ascontiguousarray(_to_numpy(value)) for key, value in state.items()}
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(arrays, tmp_name, metadata=dict(metadata) if metadata else None)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def convert_checkpoint(
    in_path: str | Path,
    out_path: str | Path,
    config: DetectorConfig | None = None,
    *,
    background: Literal["auto", "first", "last"] = "auto",
) -> WeightsReport:
    """Any supported checkpoint -> .safetensors with canonical names and layout."""
    canonical, report = canonicalize(
        read_checkpoint(in_path), config, background=background, source=str(in_path)
    )
    metadata = {
        "format": "scan-pipe-bua",
        "source": Path(in_path).name,
        "source_sha256": file_sha256(in_path),
    }
    write_safetensors(canonical, out_path, metadata)
    report.sha256 = file_sha256(out_path)
    return report


def checkpoint_info(path: str | Path, config: DetectorConfig | None = None) -> dict[str, Any]:
    """Format, key count, parameter count, digests, anchor check and whether it fits the detector."""
    path = Path(path)
    raw = read_checkpoint(path)
    arrays = {key: _to_numpy(value) for key, value in raw.items()}
    info: dict[str, Any] = {
        "path": str(path),
        "format": detect_format(path),
        "num_keys": len(arrays),
        "num_parameters": int(sum(a.size for a in arrays.values() if a.dtype.kind == "f")),
        "sha256": file_sha256(path),
    }
    try:
        canonical, report = canonicalize(arrays, config, source=str(path))
    except WeightsError as exc:
        info.update(compatible=False, error=str(exc), anchors_match=None)
        return info
    info.update(
        compatible=True,
        tensors_sha256=tensors_sha256(canonical),
        anchors_match=report.anchors_match,
        anchors_max_diff=report.anchors_max_diff,
        conversions=report.conversions,
        unexpected_keys=report.unexpected_keys,
        filled_keys=len(report.filled_keys),
    )
    return info
