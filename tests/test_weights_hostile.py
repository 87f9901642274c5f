"""Hostile and corrupt checkpoint files: each is refused with one `WeightsError` line naming the file and the
reason, before any allocation the file cannot justify.

Every file is built here (no binary blobs in the repository) and read in-process: a crash in a reader kills
pytest, which fails the run. The pickle cases follow the review of issue 8: a dtype BUILD state with an object
field (the old allowlisted unpickler segfaulted), `_reconstruct` of a 200M-element object array (2.2 GB from
131 bytes), `_reconstruct` without BUILD (uninitialised memory as weights) and code-running globals.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from extractors.bua.weights import WeightsError, read_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ pickle opcode builders
def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_stack_global(module: str, name: str) -> bytes:
    return op_str(module) + op_str(name) + pickle.STACK_GLOBAL


def op_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def op_bytes(data: bytes) -> bytes:
    return pickle.BINBYTES + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def op_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def stream(*ops: bytes) -> bytes:
    """A protocol-2 pickle of `ops` (the protocol numpy pickles of Python 2 and 3 share)."""
    return pickle.PROTO + b"\x02" + b"".join(ops) + pickle.STOP


def plain_dtype_state(byte_order: str = "<", flags: int = 0) -> bytes:
    return op_tuple(op_int(3), op_str(byte_order), pickle.NONE * 3, op_int(-1), op_int(-1), op_int(flags))


def dtype_ops(type_string: str, state: bytes | None = None) -> bytes:
    """`numpy.dtype(type_string)` then BUILD with `state` (a plain little-endian state by default)."""
    reduce = op_global("numpy", "dtype") + op_tuple(op_str(type_string), pickle.NEWFALSE, pickle.NEWTRUE)
    return reduce + pickle.REDUCE + (plain_dtype_state() if state is None else state) + pickle.BUILD


def reconstruct_ops(shape: bytes = op_tuple(op_int(0)), typecode: bytes = op_bytes(b"b")) -> bytes:
    """`_reconstruct(ndarray, shape, typecode)`: numpy always writes (0,) and b"b"."""
    args = op_tuple(op_global("numpy", "ndarray"), shape, typecode)
    return op_global("numpy.core.multiarray", "_reconstruct") + args + pickle.REDUCE


def array_ops(shape: tuple[int, ...], dtype: bytes, raw: bytes) -> bytes:
    """An array as numpy pickles it: `_reconstruct`, then BUILD (1, shape, dtype, is_fortran, rawdata)."""
    state = op_tuple(op_int(1), op_tuple(*(op_int(d) for d in shape)), dtype, pickle.NEWFALSE, op_bytes(raw))
    return reconstruct_ops() + state + pickle.BUILD


def model(*entries: tuple[str, bytes]) -> bytes:
    """{"model": {name: value}} of already encoded values."""
    inner = pickle.EMPTY_DICT + pickle.MARK + b"".join(op_str(name) + value for name, value in entries)
    return pickle.EMPTY_DICT + op_str("model") + inner + pickle.SETITEMS + pickle.SETITEM


FLOATS = np.arange(6, dtype="<f4")


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path: Path, pattern: str = "") -> str:
    """Read `path`, expecting one WeightsError line that names the file (and matches `pattern`)."""
    with pytest.raises(WeightsError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message and len(message) < 600, message
    if pattern:
        assert re.search(pattern, message), message
    return message


def test_the_hand_built_pickle_is_what_numpy_writes(tmp_path: Path) -> None:
    """The builders above produce a pickle that loads: the hostile variants below differ in one thing."""
    path = write(
        tmp_path, "ok.pkl", stream(model(("w", array_ops((2, 3), dtype_ops("f4"), FLOATS.tobytes()))))
    )
    assert pickle.loads(path.read_bytes())["model"]["w"].shape == (2, 3)  # trusted here: we built it
    np.testing.assert_array_equal(read_checkpoint(path)["w"], FLOATS.reshape(2, 3))


def test_python2_style_pickle_loads(tmp_path: Path) -> None:
    """Python 2 pickles: str (BINSTRING) keys and rawdata, integer align/copy flags in the dtype."""

    def py2_str(text: str) -> bytes:
        data = text.encode("latin-1")
        if len(data) < 8:
            return pickle.SHORT_BINSTRING + bytes([len(data)]) + data
        return pickle.BINSTRING + struct.pack("<i", len(data)) + data

    dtype = op_global("numpy", "dtype") + op_tuple(py2_str("f4"), op_int(0), op_int(1)) + pickle.REDUCE
    dtype += (
        op_tuple(op_int(3), py2_str("<"), pickle.NONE * 3, op_int(-1), op_int(-1), op_int(0)) + pickle.BUILD
    )
    args = op_tuple(op_global("numpy", "ndarray"), op_tuple(op_int(0)), py2_str("b"))
    array = op_global("numpy.core.multiarray", "_reconstruct") + args + pickle.REDUCE
    state = op_tuple(
        op_int(1), op_tuple(op_int(6)), dtype, pickle.NEWFALSE, py2_str(FLOATS.tobytes().decode("latin-1"))
    )
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + py2_str("model") + pickle.EMPTY_DICT + py2_str("w")
    data += array + state + pickle.BUILD + pickle.SETITEM + pickle.SETITEM + pickle.STOP
    np.testing.assert_array_equal(read_checkpoint(write(tmp_path, "py2.pkl", data))["w"], FLOATS)


def test_forged_dtype_flags_are_ignored(tmp_path: Path) -> None:
    """The object-ness flags of a dtype state are never trusted: the dtype is rebuilt from its type string."""
    dtype = dtype_ops("f4", plain_dtype_state(flags=0x3F))
    path = write(tmp_path, "flags.pkl", stream(model(("w", array_ops((6,), dtype, FLOATS.tobytes())))))
    loaded = read_checkpoint(path)["w"]
    assert loaded.dtype == np.float32 and not loaded.dtype.hasobject
    np.testing.assert_array_equal(loaded, FLOATS)


# The dtype of the review: a void record whose field is an object, so that array bytes become pointers.
OBJECT_DTYPE = dtype_ops(
    "O8", op_tuple(op_int(3), op_str("|"), pickle.NONE * 3, op_int(-1), op_int(-1), op_int(63))
)
OBJECT_FIELDS_STATE = op_tuple(
    op_int(3),
    op_str("|"),
    pickle.NONE,
    op_tuple(op_str("f")),
    pickle.EMPTY_DICT + op_str("f") + op_tuple(OBJECT_DTYPE, op_int(0)) + pickle.SETITEM,
    op_int(8),
    op_int(1),
    op_int(0),  # forged: "no object inside"
)
PLAIN_FIELDS_STATE = op_tuple(
    op_int(3),
    op_str("<"),
    pickle.NONE,
    op_tuple(op_str("f")),
    pickle.EMPTY_DICT + op_str("f") + op_tuple(dtype_ops("f8"), op_int(0)) + pickle.SETITEM,
    op_int(8),
    op_int(1),
    op_int(0),
)
POINTERS = b"\x41" * 8

HOSTILE_PICKLES: dict[str, tuple[bytes, str]] = {
    # 255 bytes; the allowlisted unpickler this replaces died of SIGSEGV on it (checked by hand, not here).
    "dtype_build_object_field": (
        stream(model(("w", array_ops((1,), dtype_ops("V8", OBJECT_FIELDS_STATE), POINTERS)))),
        r"refusing numpy dtype 'V8'",
    ),
    "object_field_on_a_number_type": (
        stream(model(("w", array_ops((1,), dtype_ops("f8", OBJECT_FIELDS_STATE), POINTERS)))),
        r"refusing numpy dtype 'O8'",
    ),
    "fields_on_a_number_type": (
        stream(model(("w", array_ops((1,), dtype_ops("f8", PLAIN_FIELDS_STATE), POINTERS)))),
        r"dtype 'f8' with a state other than a plain number type's",
    ),
    "object_array": (
        stream(model(("w", array_ops((1,), OBJECT_DTYPE, POINTERS)))),
        r"refusing numpy dtype 'O8'",
    ),
    "string_dtype": (
        stream(model(("w", array_ops((1,), dtype_ops("U1"), b"abcd")))),
        r"refusing numpy dtype 'U1'",
    ),
    "bad_byte_order": (stream(dtype_ops("f4", plain_dtype_state("!"))), r"invalid byte order '!'"),
    "second_dtype_build": (stream(dtype_ops("f4") + plain_dtype_state() + pickle.BUILD), r"second BUILD"),
    "reconstruct_huge_object_array": (  # the 131-byte file: _reconstruct(ndarray, (200000000,), b"O")
        stream(reconstruct_ops(op_tuple(op_int(200_000_000)), op_bytes(b"O"))),
        r"arguments numpy never writes",
    ),
    "build_shape_the_bytes_cannot_back": (
        stream(model(("w", array_ops((150, 150), dtype_ops("f4"), FLOATS[:1].tobytes())))),
        r"shape \[150, 150\] and dtype float32 needs 90000 bytes, the pickle gives 4",
    ),
    "absurd_dimension": (
        stream(model(("w", array_ops((2**31 - 1,), dtype_ops("f4"), b"")))),
        r"dimension 2147483647 is not an integer in 0\.\.",
    ),
    "absurd_dimension_of_an_empty_array": (
        stream(model(("w", array_ops((0, 2**31 - 1), dtype_ops("f4"), b"")))),
        r"dimension 2147483647 is not an integer",
    ),
    "negative_dimension": (
        stream(model(("w", array_ops((-1,), dtype_ops("f4"), b"")))),
        r"dimension -1 is not an integer",
    ),
    "too_many_dimensions": (
        stream(model(("w", array_ops((1,) * 40, dtype_ops("f4"), FLOATS[:1].tobytes())))),
        r"at most 32 dimensions",
    ),
    "reconstruct_uninitialised_float32": (  # without BUILD numpy hands back np.empty memory as weights
        stream(model(("w", reconstruct_ops(op_tuple(op_int(1000)), op_bytes(b"f"))))),
        r"arguments numpy never writes",
    ),
    "reconstruct_without_build": (stream(model(("w", reconstruct_ops()))), r"before its BUILD state"),
    "reconstruct_without_build_returned": (stream(reconstruct_ops()), r"before its BUILD state"),
    "frombuffer_huge_shape": (
        stream(
            op_global("numpy.core.numeric", "_frombuffer")
            + op_tuple(op_bytes(b"1234"), dtype_ops("f4"), op_tuple(op_int(100_000_000)), op_str("C"))
            + pickle.REDUCE
        ),
        r"dimension 100000000 is not an integer in 0\.\.\d+ \(the file size\)",
    ),
    "ndarray_called_directly": (
        stream(op_global("numpy", "ndarray") + op_tuple(op_tuple(op_int(100_000_000))) + pickle.REDUCE),
        r"refusing to call numpy\.ndarray",
    ),
    "os_system": (
        stream(op_global("os", "system") + op_tuple(op_str("true")) + pickle.REDUCE),
        r"'os\.system'",
    ),
    "posix_system_stack_global": (
        stream(op_stack_global("posix", "system") + op_tuple(op_str("true")) + pickle.REDUCE),
        r"'posix\.system'",
    ),
    "builtins_eval": (
        stream(op_global("builtins", "eval") + op_tuple(op_str("1")) + pickle.REDUCE),
        r"'builtins\.eval'",
    ),
    "py2_builtin_eval": (stream(op_global("__builtin__", "eval")), r"'__builtin__\.eval'"),
    "subprocess_popen": (stream(op_global("subprocess", "Popen")), r"'subprocess\.Popen'"),
    "copyreg_reconstructor": (stream(op_global("copyreg", "_reconstructor")), r"'copyreg\._reconstructor'"),
    "numpy_load": (stream(op_global("numpy", "load")), r"'numpy\.load'"),
    "torch_rebuild": (
        stream(op_global("torch._utils", "_rebuild_tensor_v2")),
        r"'torch\._utils\._rebuild_tensor_v2'",
    ),
    "newline_in_global_name": (stream(op_stack_global("os\nx", "system")), r"global 'os\\nx\.system'"),
    "inst_opcode": (
        pickle.PROTO + b"\x02" + pickle.MARK + pickle.INST + b"os\nsystem\n" + pickle.STOP,
        r"opcode INST",
    ),
    "obj_opcode": (stream(pickle.MARK + op_global("collections", "OrderedDict") + pickle.OBJ), r"opcode OBJ"),
    "newobj_opcode": (
        stream(op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.NEWOBJ),
        r"NEWOBJ",
    ),
    "persistent_id": (stream(op_str("x") + pickle.BINPERSID), r"opcode BINPERSID"),
    "extension_registry": (stream(pickle.EXT1 + b"\x01"), r"opcode EXT1"),
    "out_of_band_buffer": (pickle.PROTO + b"\x05" + pickle.NEXT_BUFFER + pickle.STOP, r"opcode NEXT_BUFFER"),
    "set_opcode": (stream(pickle.EMPTY_SET), r"opcode EMPTY_SET"),
    "protocol_0_text": (pickle.INT + b"1\n" + pickle.STOP, r"protocol 0/1 opcode INT"),
    "invalid_opcode": (stream(b"\xff"), r"invalid pickle opcode"),
    "future_protocol": (pickle.PROTO + b"\x09" + pickle.NONE + pickle.STOP, r"unsupported pickle protocol 9"),
    "int_dict_key": (
        stream(pickle.EMPTY_DICT + op_int(1) + op_int(2) + pickle.SETITEM),
        r"dict key of type int",
    ),
    "tuple_dict_key": (
        stream(pickle.EMPTY_DICT + op_tuple(op_int(1)) + op_int(2) + pickle.SETITEM),
        r"dict key of type tuple",
    ),
    "build_on_a_dict": (stream(pickle.EMPTY_DICT + pickle.EMPTY_DICT + pickle.BUILD), r"BUILD on a dict"),
    "stack_underflow": (stream(pickle.SETITEM), r"stack underflow"),
    "missing_mark": (stream(pickle.TUPLE), r"no MARK"),
    "unknown_memo_key": (stream(pickle.BINGET + b"\x07"), r"memo key 7 was never stored"),
    "huge_long": (stream(pickle.LONG4 + struct.pack("<i", 2**31 - 1)), r"integer of 2147483647 bytes"),
    "huge_bytes_length": (stream(pickle.BINBYTES8 + struct.pack("<Q", 2**62)), r"truncated pickle: needs"),
    "huge_frame": (
        pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", 2**40) + pickle.STOP,
        r"frame of",
    ),
    "encode_other_codec": (
        stream(op_global("_codecs", "encode") + op_tuple(op_str("x"), op_str("rot13")) + pickle.REDUCE),
        r"read only as \(text, 'latin1'\)",
    ),
    "not_a_dict": (stream(pickle.EMPTY_LIST), r"expected a dict of tensors, found list"),
    "deeply_nested_lists": (
        stream(pickle.MARK * 200_000 + pickle.LIST * 200_000),
        r"expected a dict of tensors, found list",
    ),
    "no_arrays": (
        stream(pickle.EMPTY_DICT + op_str("__author__") + op_str("x") + pickle.SETITEM),
        r"no tensors",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PICKLES))
def test_hostile_pickle_is_refused(case: str, tmp_path: Path) -> None:
    data, pattern = HOSTILE_PICKLES[case]
    assert_refused(write(tmp_path, f"{case}.pkl", data), pattern)


def test_reducers_never_run(tmp_path: Path) -> None:
    """What `pickle.dumps` writes for code-running objects, at every protocol: refused, nothing executed."""
    marker = tmp_path / "pwned"

    class Shell:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    class Eval:
        def __reduce__(self) -> tuple:
            return (eval, (f"open({str(marker)!r}, 'w')",))

    class Popen:
        def __reduce__(self) -> tuple:
            return (subprocess.Popen, (["touch", str(marker)],))

    for index, payload in enumerate((Shell(), Eval(), Popen())):
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps({"model": {"w": np.zeros(2, np.float32), "x": payload}}, protocol=protocol)
            assert_refused(write(tmp_path, f"r{index}_{protocol}.pkl", data), r"refusing to unpickle global")
    assert not marker.exists()


def test_shared_bytes_cannot_multiply_memory(tmp_path: Path) -> None:
    """One 1 MB payload referenced by 200 arrays (memo GETs) would be 200 MB of copies: refused."""
    count = 1 << 18

    def array_of(raw: bytes) -> bytes:
        state = op_tuple(op_int(1), op_tuple(op_int(count)), dtype_ops("f4"), pickle.NEWFALSE, raw)
        return reconstruct_ops() + state + pickle.BUILD

    first = array_of(op_bytes(np.zeros(count, np.float32).tobytes()) + pickle.BINPUT + b"\x02")
    shared = array_of(pickle.BINGET + b"\x02")  # the same bytes object again
    entries = [("a", first)] + [(f"b{i}", shared) for i in range(200)]
    assert_refused(
        write(tmp_path, "shared.pkl", stream(model(*entries))), r"more memory than its \d+ bytes justify"
    )


def test_opcode_flood_is_bounded(tmp_path: Path) -> None:
    """2 MB of EMPTY_DICT would be 2M dicts (~150 MB): opcodes are charged against the file size."""
    assert_refused(write(tmp_path, "flood.pkl", stream(pickle.EMPTY_DICT * (2 << 20))), r"more memory than")


VALID_ARRAYS = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "i64": np.array(7, dtype=np.int64),
    "f16": np.linspace(-1, 1, 4).astype(np.float16),
    "flags": np.array([True, False, True]),
}


def valid_pickle(protocol: int, fuzz_payload: bool = False) -> bytes:
    """A small published-layout pickle; `fuzz_payload` adds 96 floats, so that random byte flips often land
    in array data (and load) rather than in the structure (and are refused)."""
    arrays = dict(VALID_ARRAYS)
    if fuzz_payload:
        arrays["payload"] = np.linspace(0, 1, 96, dtype=np.float32)
    return pickle.dumps({"model": arrays, "__author__": "test"}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_every_truncation_of_a_pickle_is_refused(protocol: int, tmp_path: Path) -> None:
    data = valid_pickle(protocol)
    assert set(read_checkpoint(write(tmp_path, "full.pkl", data))) == set(VALID_ARRAYS)
    assert_refused(write(tmp_path, "empty.pkl", b""), r": empty file$")
    for size in range(1, len(data)):
        assert_refused(write(tmp_path, "cut.pkl", data[:size]), r"truncated")


# -------------------------------------------------------------------------------------------- memory bound
_CHILD = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
from extractors.bua.pickle_data import PickleDataError, load_pickle_data
for name in sys.argv[1:]:
    with open(name, "rb") as handle:
        try:
            load_pickle_data(handle, os.fstat(handle.fileno()).st_size)
        except PickleDataError as exc:
            print("refused:", exc)
"""


def test_memory_cases_are_refused_under_a_small_address_space(tmp_path: Path) -> None:
    """With 768 MB of address space the huge `_reconstruct` (2.2 GB if allocated) and the shape the bytes
    cannot back are refused by the check, not by a MemoryError: nothing was allocated first."""
    names = ("reconstruct_huge_object_array", "build_shape_the_bytes_cannot_back", "frombuffer_huge_shape")
    paths = [str(write(tmp_path, f"{name}.pkl", HOSTILE_PICKLES[name][0])) for name in names]
    paths.append(str(write(tmp_path, "flood.pkl", stream(pickle.EMPTY_DICT * (2 << 20)))))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *paths],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("refused:") == len(paths), result.stdout
    assert "MemoryError" not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------ safetensors
def safetensors_bytes(header: dict | bytes, data: bytes, header_size: int | None = None) -> bytes:
    """A .safetensors file: 8-byte little-endian header length, JSON header, data section."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(encoded) if header_size is None else header_size
    return struct.pack("<Q", size) + encoded + data


def f32_entry(shape: list, begin: int, end: int, dtype: object = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


EIGHT_FLOATS = np.arange(8, dtype="<f4").tobytes()
HOSTILE_SAFETENSORS: dict[str, tuple[bytes, str]] = {
    "header_longer_than_file": (
        safetensors_bytes({"w": f32_entry([2], 0, 8)}, EIGHT_FLOATS[:8], header_size=10**6),
        r"header length 1000000 exceeds the file",
    ),
    "header_length_max": (
        safetensors_bytes({"w": f32_entry([2], 0, 8)}, EIGHT_FLOATS[:8], header_size=2**64 - 1),
        r"exceeds the file",
    ),
    "header_not_json": (safetensors_bytes(b"{not json", b""), r"header is not valid JSON"),
    "header_not_utf8": (safetensors_bytes(b'{"\xff": 1}', b""), r"header is not valid JSON"),
    "header_deeply_nested": (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, b""), r"not valid JSON"),
    "header_not_an_object": (safetensors_bytes([1, 2], b""), r"header is not a JSON object"),
    "duplicate_tensor_name": (
        safetensors_bytes(
            b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            EIGHT_FLOATS[:16],
        ),
        r"duplicate key",
    ),
    "metadata_not_strings": (
        safetensors_bytes({"__metadata__": {"a": [1]}, "w": f32_entry([2], 0, 8)}, EIGHT_FLOATS[:8]),
        r"__metadata__ is not a map of strings",
    ),
    "entry_not_an_object": (safetensors_bytes({"w": 5}, b""), r"entry 'w' is not a JSON object"),
    "offsets_past_the_end": (
        safetensors_bytes({"w": f32_entry([2], 0, 1000)}, EIGHT_FLOATS[:16]),
        r"data_offsets \[0, 1000\] lie outside the 16-byte data section",
    ),
    "negative_offset": (
        safetensors_bytes({"w": f32_entry([2], -8, 0)}, EIGHT_FLOATS[:8]),
        r"data_offsets \[-8, 0\] lie outside",
    ),
    "reversed_offsets": (
        safetensors_bytes({"w": f32_entry([2], 8, 0)}, EIGHT_FLOATS[:8]),
        r"data_offsets \[8, 0\] lie outside",
    ),
    "offsets_not_integers": (
        safetensors_bytes({"w": f32_entry([2], 0.0, 8.0)}, EIGHT_FLOATS[:8]),
        r"invalid data_offsets",
    ),
    "overlapping_tensors": (
        safetensors_bytes({"a": f32_entry([2], 0, 8), "b": f32_entry([2], 4, 12)}, EIGHT_FLOATS[:12]),
        r"tensor 'b' overlaps the tensor before it",
    ),
    "gap_between_tensors": (
        safetensors_bytes({"a": f32_entry([2], 0, 8), "b": f32_entry([2], 12, 20)}, EIGHT_FLOATS[:20]),
        r"tensor 'b' leaves a gap before it",
    ),
    "unindexed_trailing_bytes": (
        safetensors_bytes({"a": f32_entry([2], 0, 8)}, EIGHT_FLOATS[:20]),
        r"12 bytes after the last tensor are not indexed",
    ),
    "wrong_extent": (
        safetensors_bytes({"w": f32_entry([3], 0, 8)}, EIGHT_FLOATS[:8]),
        r"tensor 'w' of shape \[3\] \(F32\) needs 12 bytes, its data_offsets span 8",
    ),
    "huge_shape_small_extent": (
        safetensors_bytes({"w": f32_entry([10**6, 10**6], 0, 8)}, EIGHT_FLOATS[:8]),
        r"invalid shape",
    ),
    "negative_dimension": (
        safetensors_bytes({"w": f32_entry([-2], 0, 8)}, EIGHT_FLOATS[:8]),
        r"invalid shape",
    ),
    "absurd_dimension_of_an_empty_tensor": (
        safetensors_bytes({"w": f32_entry([0, 2**40], 0, 0)}, b""),
        r"invalid shape",
    ),
    "float_dimension": (safetensors_bytes({"w": f32_entry([2.0], 0, 8)}, EIGHT_FLOATS[:8]), r"invalid shape"),
    "bool_dimension": (safetensors_bytes({"w": f32_entry([True], 0, 4)}, EIGHT_FLOATS[:4]), r"invalid shape"),
    "too_many_dimensions": (
        safetensors_bytes({"w": f32_entry([1] * 40, 0, 4)}, EIGHT_FLOATS[:4]),
        r"invalid shape",
    ),
    "shape_not_a_list": (safetensors_bytes({"w": f32_entry("2", 0, 8)}, EIGHT_FLOATS[:8]), r"invalid shape"),
    "long_name_is_shortened": (
        safetensors_bytes({"n" * 10_000: f32_entry([2], 0, 8, dtype="O")}, EIGHT_FLOATS[:8]),
        r"tensor 'n{77}\.\.\.' has dtype 'O'",
    ),
}
for _dtype in ("O", "object", "V8", "str", "U", "C64", "complex64", "F8_E4M3", 5, ["F32"], None, {"a": 1}):
    HOSTILE_SAFETENSORS[f"dtype_{json.dumps(_dtype)}"] = (
        safetensors_bytes({"w": f32_entry([2], 0, 8, dtype=_dtype)}, EIGHT_FLOATS[:8]),
        r"tensor 'w' has dtype .*; weights are BOOL",
    )


@pytest.mark.parametrize("case", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_is_refused(case: str, tmp_path: Path) -> None:
    data, pattern = HOSTILE_SAFETENSORS[case]
    assert_refused(write(tmp_path, "hostile.safetensors", data), pattern)


def test_safetensors_header_over_the_cap_is_refused_unread(tmp_path: Path) -> None:
    """A 200 MB header in a (sparse) 200 MB file: refused from its length alone, before it is read."""
    path = tmp_path / "big_header.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 200 << 20))
        handle.truncate(8 + (200 << 20))
    assert_refused(path, r"safetensors header of 209715200 bytes \(over 100 MB\)")


def test_valid_safetensors_load_identically(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "bf16": torch.tensor([1.5, -2.25, 3e38], dtype=torch.bfloat16),
        "f16": torch.tensor([0.5, 1.0], dtype=torch.float16),
        "i64": torch.tensor(7, dtype=torch.int64),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path))
    loaded = read_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected)


def valid_safetensors(fuzz_payload: bool = False) -> bytes:
    header = {
        "__metadata__": {"format": "pt"},
        "a": f32_entry([2, 2], 0, 16),
        "b": {"dtype": "I64", "shape": [], "data_offsets": [16, 24]},
        "c": {"dtype": "BOOL", "shape": [3], "data_offsets": [24, 27]},
    }
    data = np.arange(4, dtype="<f4").tobytes() + np.array(7, "<i8").tobytes() + b"\x00\x01\x02"
    if fuzz_payload:
        header["payload"] = f32_entry([96], 27, 27 + 384)
        data += np.linspace(0, 1, 96, dtype="<f4").tobytes()
    return safetensors_bytes(header, data)


def test_every_truncation_of_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    data = valid_safetensors()
    loaded = read_checkpoint(write(tmp_path, "full.safetensors", data))
    np.testing.assert_array_equal(loaded["c"], [False, True, True])  # any non-zero byte is True
    for size in range(len(data)):
        assert_refused(write(tmp_path, "cut.safetensors", data[:size]))


# ---------------------------------------------------------------------------------------------- torch .bin
def test_bin_with_a_code_running_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Shell:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.bin"
    torch.save({"w": torch.zeros(2), "x": Shell()}, path)
    assert zipfile.is_zipfile(path)
    assert_refused(path, r"cannot read torch checkpoint: .*unsupported GLOBAL (posix|os|nt)\.system")
    assert not marker.exists()


def test_legacy_bin_pickle_with_a_global_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, "legacy.bin", stream(op_global("os", "system") + op_tuple(op_str("true")) + pickle.REDUCE)
    )
    assert_refused(path, r"cannot read torch checkpoint")


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize(
    ("name", "tensor", "pattern"),
    [
        ("complex", torch.zeros(2, dtype=torch.complex64), r"holds a torch\.complex64 torch\.strided tensor"),
        ("sparse", torch.zeros(3).to_sparse(), r"torch\.sparse_coo"),
        ("repeated_view", torch.zeros(1).expand(10**8), r"tensors span 400000000 bytes, more than its"),
    ],
)
def test_bin_with_non_numeric_or_amplifying_tensors_is_refused(
    name: str, tensor: torch.Tensor, pattern: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.bin"
    torch.save({"w": tensor}, path)
    assert_refused(path, pattern)


def test_zip_records_larger_than_the_file_are_refused(tmp_path: Path) -> None:
    """A compressed record (zip bomb): torch's reader would allocate its declared size; refused first."""
    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(20 << 20))
    assert_refused(path, r"zip records declare 20971520 bytes in a \d+-byte file")


def test_truncated_and_empty_bins_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "full.bin"
    torch.save({"w": torch.arange(4.0)}, path)
    data = path.read_bytes()
    np.testing.assert_array_equal(read_checkpoint(path)["w"].numpy(), [0, 1, 2, 3])
    for size in (0, 1, 4, 30, 100, len(data) // 2, len(data) - 22, len(data) - 1):
        assert_refused(write(tmp_path, "cut.bin", data[:size]), r"cannot read torch checkpoint")


# ----------------------------------------------------------------------------------------------------- fuzz
def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption: flipped bytes, an inserted or deleted run, a truncation, a repeated slice."""
    buffer = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            buffer[rng.randrange(len(buffer))] = rng.randrange(256)
    elif kind == 1:
        at = rng.randrange(len(buffer) + 1)
        buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 2:
        at = rng.randrange(len(buffer))
        del buffer[at : at + rng.randint(1, 16)]
    elif kind == 3:
        del buffer[rng.randrange(len(buffer)) :]
    else:
        at, size = rng.randrange(len(buffer)), rng.randint(1, 32)
        buffer[at:at] = buffer[rng.randrange(len(buffer)) :][:size]
    return bytes(buffer)


@pytest.mark.parametrize(
    ("suffix", "make_valid"),
    [
        (".pkl", lambda: valid_pickle(2, fuzz_payload=True)),
        (".pkl", lambda: valid_pickle(5, fuzz_payload=True)),
        (".safetensors", lambda: valid_safetensors(fuzz_payload=True)),
    ],
    ids=["pickle2", "pickle5", "safetensors"],
)
def test_random_mutations_load_as_numbers_or_raise_weights_error(
    suffix: str, make_valid: object, tmp_path: Path
) -> None:
    """300 seeded corruptions of a valid file: each loads to numeric arrays or raises WeightsError, nothing
    else (no other exception, no crash: the reader runs in this process)."""
    valid = make_valid()  # type: ignore[operator]
    rng = random.Random(8)
    path = tmp_path / f"fuzz{suffix}"
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(300):
        path.write_bytes(mutate(valid, rng))
        try:
            state = read_checkpoint(path)
        except WeightsError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), str(exc)
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        for value in state.values():
            assert isinstance(value, np.ndarray) and value.dtype.kind in "fiub" and not value.dtype.hasobject
    assert outcomes["refused"] > 100 and outcomes["loaded"] >= 3, outcomes  # both paths were exercised


# ------------------------------------------------------------------------------------------------------ CLI
CLI_CASES = {
    "global.pkl": HOSTILE_PICKLES["os_system"][0],
    "object_field.pkl": HOSTILE_PICKLES["dtype_build_object_field"][0],
    "huge.pkl": HOSTILE_PICKLES["reconstruct_huge_object_array"][0],
    "overflow.safetensors": HOSTILE_SAFETENSORS["header_longer_than_file"][0],
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_reports_one_line_without_traceback(name: str, tmp_path: Path) -> None:
    """`weights info`, `weights convert` and `extract --weights` exit non-zero with one `error:` line."""
    from stages.cli import app

    path = write(tmp_path, name, CLI_CASES[name])
    (tmp_path / "images").mkdir()
    extract = ["extract", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "store")]
    commands = {
        1: ["weights", "info", str(path)],
        2: ["weights", "convert", str(path), str(tmp_path / "out.safetensors")],
        3: [*extract, "--arch", "tiny", "--weights", str(path)],
    }
    for index, args in commands.items():
        result = CliRunner().invoke(app, args)
        expected_code = 2 if args[0] == "extract" else 1
        assert result.exit_code == expected_code, (index, result.output)
        assert isinstance(result.exception, SystemExit), (index, result.exception)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "store").exists()


def test_cli_prints_names_from_the_file_literally(tmp_path: Path) -> None:
    """A tensor name that looks like rich markup is printed as text (rich would raise on '[/bold]')."""
    from stages.cli import app

    path = write(
        tmp_path,
        "markup.safetensors",
        safetensors_bytes({"[/bold]": f32_entry([2], 0, 8, dtype="O")}, bytes(8)),
    )
    for args in (
        ["weights", "info", str(path)],
        ["weights", "convert", str(path), str(tmp_path / "o.safetensors")],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert "tensor '[/bold]' has dtype 'O'" in result.output
    out = tmp_path / "out"
    extract = ["extract", "--images", str(tmp_path), "--out", str(out), "--arch", "tiny"]
    result = CliRunner().invoke(app, [*extract, "--weights", str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert "tensor '[/bold]' has dtype 'O'" in " ".join(result.output.split())
