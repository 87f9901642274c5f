"""Reading the published detector checkpoints safely, mapping them onto the model, and digests.

Canonical layout = the HF `unc-nlp/frcnn-vg-finetuned` state dict (detectron2-style names, background in the
LAST class row, 12 sigmoid objectness logits, `proposal_generator.anchor_generator.cell_anchors.0` stored).
Accepted inputs: the HF `pytorch_model.bin` (torch.load with weights_only=True), the converted
`faster_rcnn_from_caffe_attr.pkl` (pickle of {"model": {name: ndarray}}, interpreted as data by
`pickle_data`, never unpickled) and `.safetensors` (header and extents validated before any allocation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from extractors.bua.pickle_data import MAX_NDIM, PickleDataError, load_pickle_data

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
MAX_SAFETENSORS_HEADER = 100 << 20
TENSOR_BYTES_SLACK = 1 << 20
# safetensors dtype -> (numpy dtype of the stored bytes, widening after the read). Bool bytes are normalised
# (any non-zero byte is True) and BF16 is widened exactly to float32, numpy having no bfloat16.
_SAFETENSORS_DTYPES: dict[str, tuple[str, str | None]] = {
    "BOOL": ("|u1", "bool"),
    "U8": ("|u1", None),
    "I8": ("|i1", None),
    "U16": ("<u2", None),
    "I16": ("<i2", None),
    "U32": ("<u4", None),
    "I32": ("<i4", None),
    "U64": ("<u8", None),
    "I64": ("<i8", None),
    "F16": ("<f2", None),
    "F32": ("<f4", None),
    "F64": ("<f8", None),
    "BF16": ("<u2", "bf16"),
}
_TORCH_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
    }
)
_TORCH_ADVICE_PREFIXES = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one short line (torch's weights_only errors are paragraphs of advice)."""
    lines = (line.strip() for line in str(exc).splitlines())
    text = " ".join(line for line in lines if line and not line.startswith(_TORCH_ADVICE_PREFIXES))
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(name: str) -> str:
    """A tensor name for an error message, shortened: a hostile header may hold megabyte-long names."""
    return repr(name if len(name) <= 80 else name[:77] + "...")


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


def _read_pickle(path: Path) -> Mapping[str, Any]:
    """A numpy pickle read as data by `pickle_data` (never unpickled: no global is ever called)."""
    try:
        with open(path, "rb") as handle:
            data = load_pickle_data(handle, os.fstat(handle.fileno()).st_size)
    except PickleDataError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return _unwrap(data, str(path))


def _safetensors_entries(
    header_bytes: bytes, data_size: int, file_size: int, source: str
) -> dict[str, tuple[str, str | None, tuple[int, ...], int]]:
    """name -> (stored numpy dtype, widening, shape, offset) of a header whose extents exactly tile the data
    section: known dtype, sane shape, `prod(shape) * itemsize` bytes each, in bounds, no overlap, no gap."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key in the header")
        return dict(pairs)

    try:
        header = json.loads(header_bytes, object_pairs_hook=refuse_duplicates)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightsError(f"{source}: safetensors header is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{source}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise WeightsError(f"{source}: safetensors __metadata__ is not a map of strings")
    entries: dict[str, tuple[str, str | None, tuple[int, ...], int]] = {}
    extents: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise WeightsError(f"{source}: safetensors entry {_quote(name)} is not a JSON object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            shown = repr(dtype_name)[:40]
            raise WeightsError(
                f"{source}: tensor {_quote(name)} has dtype {shown}; weights are BOOL, U8-U64, I8-I64, "
                "F16, BF16, F32 or F64"
            )
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(dim) is int and 0 <= dim <= file_size for dim in shape)
        ):
            raise WeightsError(
                f"{source}: tensor {_quote(name)} has an invalid shape (at most {MAX_NDIM} integers in "
                f"0..{file_size}, the file size)"
            )
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise WeightsError(f"{source}: tensor {_quote(name)} has invalid data_offsets (two integers)")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise WeightsError(
                f"{source}: tensor {_quote(name)} data_offsets [{begin}, {end}] lie outside the "
                f"{data_size}-byte data section"
            )
        stored, widen = _SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * np.dtype(stored).itemsize
        if end - begin != nbytes:
            raise WeightsError(
                f"{source}: tensor {_quote(name)} of shape {shape} ({dtype_name}) needs {nbytes} bytes, its "
                f"data_offsets span {end - begin}"
            )
        entries[name] = (stored, widen, tuple(shape), begin)
        extents.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(extents):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise WeightsError(f"{source}: tensor {_quote(name)} {problem} in the data section")
        position = end
    if position != data_size:
        raise WeightsError(f"{source}: {data_size - position} bytes after the last tensor are not indexed")
    return entries


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Header length, JSON header and every tensor extent are checked against the file before anything is
    allocated; each tensor is then read straight into its own array."""
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({file_size} bytes, no header length)")
        header_size = int.from_bytes(prefix, "little")
        if header_size > file_size - 8:
            raise WeightsError(
                f"{path}: safetensors header length {header_size} exceeds the file ({file_size} bytes)"
            )
        if header_size > MAX_SAFETENSORS_HEADER:
            raise WeightsError(
                f"{path}: safetensors header of {header_size} bytes (over {MAX_SAFETENSORS_HEADER >> 20} MB)"
            )
        header_bytes = handle.read(header_size)
        if len(header_bytes) != header_size:
            raise WeightsError(f"{path}: truncated safetensors header")
        data_start = 8 + header_size
        entries = _safetensors_entries(header_bytes, file_size - data_start, file_size, str(path))
        arrays: dict[str, np.ndarray] = {}
        for name, (stored, widen, shape, offset) in entries.items():
            array = np.empty(shape, dtype=stored)
            if array.nbytes:
                handle.seek(data_start + offset)
                if handle.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                    raise WeightsError(
                        f"{path}: tensor {_quote(name)} is truncated (file changed while read?)"
                    )
            if widen == "bool":
                array = array != 0
            elif widen == "bf16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = array
    return arrays


def _check_zip_sizes(path: Path) -> None:
    """torch's zip reader allocates each record's declared size: sizes the file cannot hold are refused."""
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except Exception as exc:  # zipfile's failures on a broken archive are not a closed set
        raise WeightsError(
            f"{path}: cannot read torch checkpoint: broken zip archive: {_one_line(exc)}"
        ) from None
    if declared > file_size:
        raise WeightsError(
            f"{path}: zip records declare {declared} bytes in a {file_size}-byte file (compressed or forged "
            "records; torch.save stores them uncompressed)"
        )


def _read_torch(path: Path) -> Mapping[str, Any]:
    """torch.load with weights_only (no global outside torch's allowlist) and no mmap."""
    if zipfile.is_zipfile(path):
        _check_zip_sizes(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # torch.load's failures on malformed files are not a closed set
        raise WeightsError(f"{path}: cannot read torch checkpoint: {_one_line(exc)}") from None
    return _unwrap(loaded, str(path))


def _check_tensor(key: str, value: torch.Tensor, source: str) -> None:
    if value.dtype not in _TORCH_DTYPES or value.layout != torch.strided or value.device.type != "cpu":
        raise WeightsError(
            f"{source}: key {_quote(key)} holds a {value.dtype} {value.layout} tensor on {value.device}, "
            "expected dense numbers on the CPU"
        )


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray | torch.Tensor]:
    """All array entries of a checkpoint file, names as stored; non-array entries (metadata) are dropped.

    Every malformed or hostile file raises `WeightsError` naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    fmt = detect_format(path)
    source = str(path)
    try:
        if fmt == "safetensors":
            raw: Mapping[str, Any] = _read_safetensors(path)
        elif fmt == "pickle":
            raw = _read_pickle(path)
        else:
            raw = _read_torch(path)
    except MemoryError:
        raise WeightsError(f"{path}: not enough memory to read this {fmt} checkpoint") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    state: dict[str, np.ndarray | torch.Tensor] = {}
    tensor_bytes = 0
    for key, value in raw.items():
        if isinstance(value, torch.Tensor):
            _check_tensor(str(key), value, source)
            tensor_bytes += value.numel() * value.element_size()
            state[str(key)] = value
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in "fiub":
                raise WeightsError(
                    f"{path}: key {_quote(str(key))} holds a {value.dtype} array, expected numbers"
                )
            state[str(key)] = value
    if not state:
        raise WeightsError(f"{path}: no tensors found in the checkpoint")
    file_size = path.stat().st_size
    if tensor_bytes > 2 * file_size + TENSOR_BYTES_SLACK:
        # Views may share a storage or repeat it (stride 0): every later copy would multiply the file.
        raise WeightsError(
            f"{path}: its tensors span {tensor_bytes} bytes, more than its {file_size}-byte file holds "
            "(overlapping or repeated views of the stored data)"
        )
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
        if key in state and state[key].ndim and state[key].shape[0] == 2 * num_anchors:
            softmax = state[key]
            state[key] = (softmax[num_anchors:] - softmax[:num_anchors]).astype(softmax.dtype)
            if suffix == ".weight":
                report.conversions.append("24-channel softmax objectness -> sigmoid logits (W_fg - W_bg)")

    num_classes = config.num_classes
    bbox_key = _BBOX_PRED + ".weight"
    bbox_rows = state[bbox_key].shape[0] if bbox_key in state and state[bbox_key].ndim else None
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
            if _BBOX_PRED + suffix in state and state[_BBOX_PRED + suffix].ndim:
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
