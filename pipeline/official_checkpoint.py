"""Reading a `model_best.pth.tar` written by the official SCAN `train.py`, without executing the file.

The file is a pickle (torch zip or torch's legacy format) of `{epoch, model: [img_state, txt_state],
best_rsum, opt: argparse.Namespace, Eiters}`. Two layers keep a crafted file harmless:

1. A scan of the pickle streams by an unpickler whose globals are inert stand-ins of our own: only the names
   an official checkpoint uses are admitted (anything else is refused, naming the global), nothing from the
   file is called, and the storages it declares are summed, so a header cannot make the load allocate more
   than the file holds.
2. `torch.load(weights_only=True)` with exactly one extra allowed class, `argparse.Namespace`, read as data
   (`map_location="cpu"`: real files record their storages on `cuda:0`).

Every tensor is then checked to be a dense CPU float tensor lying inside its storage, so no shape in the file
can make a later copy allocate beyond the file's size.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

# Far above any SCAN checkpoint (COCO's is ~100 MB); the scan below reads the pickle part into memory.
MAX_CHECKPOINT_BYTES = 4 << 30
# Bytes per element of the storage classes torch pickles (legacy typed-storage names).
STORAGE_ITEMSIZE: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
}
REBUILD_FUNCTIONS = frozenset({("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2")})
TOP_LEVEL_KEYS = frozenset({"epoch", "model", "best_rsum", "opt", "Eiters"})
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16)
LEGACY_PICKLES_BEFORE_DATA = 3  # magic number, protocol version, system info


class OfficialCheckpointError(UserError):
    """A file is not a readable official SCAN checkpoint; the message names the file and what is wrong."""


@dataclass(frozen=True)
class OfficialCheckpoint:
    """The parts of an official checkpoint, as data."""

    path: Path
    layout: str  # "zip" or "legacy"
    sha256: str
    opt: dict[str, Any]
    image_state: dict[str, torch.Tensor]
    text_state: dict[str, torch.Tensor]
    epoch: int  # 0-based epoch that was saved
    best_rsum: float | None
    iterations: int | None


@dataclass(frozen=True)
class _StorageRef:
    type_name: str
    key: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE_ITEMSIZE[self.type_name]


class _Inert:
    """Stand-in for an admitted global: the scan builds these instead of calling anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _ScanUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict, not a sized array
    """Walks a checkpoint pickle with inert globals, recording the storages it declares."""

    def __init__(self, stream: io.BytesIO, source: Path) -> None:
        super().__init__(stream, encoding="utf-8")
        self.source = source
        self.storages: list[_StorageRef] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) in REBUILD_FUNCTIONS or (module, name) == ("argparse", "Namespace"):
            return _Inert
        if module in ("torch", "torch.cuda") and name in STORAGE_ITEMSIZE:
            return name  # the storage type travels in the persistent id as its name
        shown = f"{module}.{name}"[:120]
        raise OfficialCheckpointError(
            f"{self.source}: refusing global {shown!r}: an official SCAN checkpoint holds only tensors, "
            "OrderedDicts and argparse.Namespace (nothing in the file was executed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise OfficialCheckpointError(f"{self.source}: unexpected persistent id in the pickle")
        type_name, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if type_name not in STORAGE_ITEMSIZE or not isinstance(key, str) or not isinstance(numel, int):
            raise OfficialCheckpointError(f"{self.source}: malformed storage record in the pickle")
        if numel < 0:
            raise OfficialCheckpointError(f"{self.source}: storage {key!r} declares {numel} elements")
        self.storages.append(_StorageRef(type_name, key, numel))
        return _Inert()


def _scan_pickle(stream: io.BytesIO, source: Path) -> list[_StorageRef]:
    unpickler = _ScanUnpickler(stream, source)
    try:
        unpickler.load()
    except OfficialCheckpointError:
        raise
    except Exception as exc:  # a malformed stream fails in many ways; all of them mean "not a checkpoint"
        raise OfficialCheckpointError(
            f"{source}: not an official SCAN checkpoint (unreadable pickle: {type(exc).__name__})"
        ) from None
    return unpickler.storages


def _declared_storages(path: Path, data: bytes) -> tuple[str, list[_StorageRef]]:
    """Scan the file's pickles (layer 1); returns its layout and the storages it declares, each checked."""
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
            records = {info.filename: info for info in archive.infolist()}
        except Exception as exc:  # zipfile's failures on a broken archive are not a closed set
            raise OfficialCheckpointError(f"{path}: broken zip archive ({type(exc).__name__})") from None
        pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise OfficialCheckpointError(f"{path}: not a torch checkpoint (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if records[pickles[0]].file_size > len(data):
            raise OfficialCheckpointError(f"{path}: zip record sizes exceed the file")
        storages = _scan_pickle(io.BytesIO(archive.read(pickles[0])), path)
        for storage in storages:
            record = records.get(f"{prefix}data/{storage.key}")
            if record is None or record.file_size != storage.nbytes:
                raise OfficialCheckpointError(
                    f"{path}: storage {storage.key!r} declares {storage.nbytes} bytes but its zip record "
                    f"{'is missing' if record is None else f'holds {record.file_size}'}"
                )
        layout = "zip"
    else:
        stream = io.BytesIO(data)
        for _ in range(LEGACY_PICKLES_BEFORE_DATA):
            _scan_pickle(stream, path)
        storages = _scan_pickle(stream, path)
        layout = "legacy"
    total = sum({storage.key: storage.nbytes for storage in storages}.values())
    if total > len(data):
        raise OfficialCheckpointError(
            f"{path}: storages declare {total} bytes in a {len(data)}-byte file (truncated or forged)"
        )
    return layout, storages


def _check_state(state: Any, part: str, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise OfficialCheckpointError(f"{path}: key 'model' {part} is not a dict of named tensors")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise OfficialCheckpointError(f"{path}: key 'model' {part} entry {name!r} is not a tensor")
        if tensor.dtype not in FLOAT_DTYPES or tensor.layout != torch.strided:
            raise OfficialCheckpointError(
                f"{path}: key 'model' {part} entry {name!r} is a {tensor.dtype} tensor, expected float "
                "weights"
            )
        if (
            not tensor.is_contiguous()
            or (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
            > tensor.untyped_storage().nbytes()
        ):
            raise OfficialCheckpointError(
                f"{path}: key 'model' {part} entry {name!r} does not lie densely inside its storage"
            )
    return dict(state)


def read_official_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Read an official SCAN checkpoint as data; every problem is an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"{path}: checkpoint file not found")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise OfficialCheckpointError(
            f"{path}: {size} bytes, more than the {MAX_CHECKPOINT_BYTES} an official SCAN checkpoint can hold"
        )
    data = path.read_bytes()
    layout, _ = _declared_storages(path, data)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # torch.load's failures on malformed files are not a closed set
        message = " ".join(str(exc).split())[:300]
        raise OfficialCheckpointError(f"{path}: cannot read torch checkpoint: {message}") from None
    if not isinstance(loaded, dict):
        raise OfficialCheckpointError(f"{path}: not an official SCAN checkpoint (top level is not a dict)")
    missing = sorted({"model", "opt"} - set(loaded))
    if missing:
        raise OfficialCheckpointError(
            f"{path}: not an official SCAN checkpoint (missing key {missing[0]!r}; expected "
            f"{sorted(TOP_LEVEL_KEYS)})"
        )
    model = loaded["model"]
    if not isinstance(model, (list, tuple)) or len(model) != 2:
        raise OfficialCheckpointError(
            f"{path}: key 'model' must be the list [image encoder state, text encoder state]"
        )
    if not isinstance(loaded["opt"], argparse.Namespace):
        raise OfficialCheckpointError(f"{path}: key 'opt' is not the train.py argparse.Namespace")
    epoch, best_rsum, iterations = loaded.get("epoch", 0), loaded.get("best_rsum"), loaded.get("Eiters")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise OfficialCheckpointError(f"{path}: key 'epoch' is not a non-negative integer")
    if best_rsum is not None and not isinstance(best_rsum, (int, float)):
        raise OfficialCheckpointError(f"{path}: key 'best_rsum' is not a number")
    if iterations is not None and not isinstance(iterations, int):
        raise OfficialCheckpointError(f"{path}: key 'Eiters' is not an integer")
    return OfficialCheckpoint(
        path=path,
        layout=layout,
        sha256=hashlib.sha256(data).hexdigest(),
        opt=dict(vars(loaded["opt"])),
        image_state=_check_state(model[0], "[0] (image encoder)", path),
        text_state=_check_state(model[1], "[1] (text encoder)", path),
        epoch=epoch,
        best_rsum=None if best_rsum is None else float(best_rsum),
        iterations=iterations,
    )
