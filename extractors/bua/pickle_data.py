"""Reading a pickle stream as plain data, without the unpickler's object machinery.

A weights pickle (the detectron2 `faster_rcnn_from_caffe_attr.pkl`, any `pickle.dump` of a numpy state dict)
holds only containers, numbers, strings and numpy arrays. `pickle.Unpickler`, even behind an allowlist, CALLS
the globals it admits with the file's arguments: `numpy.dtype.__setstate__` turns file bytes into object
pointers (a 357-byte file crashes the process) and `_reconstruct` allocates whatever shape it is given (a
131-byte file asks for gigabytes). Here the opcodes are interpreted one by one: the few numpy globals are
recognised by name and never called, dtypes are built from an allowlist of plain numeric types, and an array
is allocated only once its bytes are in hand and match its shape, so the memory used is bounded by the file
size.
"""

from __future__ import annotations

import io
import math
import pickletools
import struct
from typing import Any, BinaryIO, NoReturn

import numpy as np

MAX_NDIM = 32
MAX_LONG_BYTES = 64  # LONG1/LONG4 payloads: weights pickles hold small integers only
MAX_GLOBAL_NAME = 256
# Memory budget: 2x the file (protocol 2 stores array bytes as latin-1 text: one encode, then one copy) plus
# this slack; every opcode is charged as one small Python object, so no byte pattern can amplify.
ALLOCATION_SLACK = 32 << 20
OPCODE_COST = 64

# numpy's pickled type strings (`dtype.__reduce__`) of the plain numeric types.
PLAIN_TYPE_STRINGS = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})

_GLOBAL_KINDS: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("_codecs", "encode"): "encode",  # protocol 2 writes bytes as _codecs.encode(latin1_text, "latin1")
    ("codecs", "encode"): "encode",
    ("__builtin__", "bytes"): "bytes",  # ... and b"" as bytes()
    ("builtins", "bytes"): "bytes",
    ("collections", "OrderedDict"): "ordered_dict",
}
_OPCODE_NAMES: dict[int, str] = {ord(op.code): op.name for op in pickletools.opcodes}
_TEXT_OPCODES = frozenset({"INT", "LONG", "FLOAT", "STRING", "UNICODE", "PUT", "GET"})  # protocol 0/1


class PickleDataError(ValueError):
    """The stream is not a plain-data weights pickle; the message says why and at which byte."""


def _shown(text: str, limit: int = 60) -> str:
    """Text from the file for a one-line message: short and printable (a hostile pickle chooses it)."""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text if text.isprintable() else ascii(text)[1:-1]


def plain_dtype(type_string: str, byte_order: str = "=") -> np.dtype:
    """The numpy dtype of an allowlisted type string ("f4", "i8", "b1", ...); anything else is refused."""
    if type_string not in PLAIN_TYPE_STRINGS:
        raise PickleDataError(
            f"refusing numpy dtype '{_shown(type_string)}': only bool, int8-64, uint8-64 and float16/32/64 "
            "arrays are weights"
        )
    if byte_order not in ("<", ">", "=", "|"):
        raise PickleDataError(f"invalid byte order '{_shown(byte_order)}' for dtype '{type_string}'")
    if type_string[1] == "1":
        return np.dtype(type_string)
    if byte_order == "|":
        raise PickleDataError(f"byte order '|' given for the multi-byte dtype '{type_string}'")
    return np.dtype(byte_order + type_string)


def _is_one_of(value: Any, *options: object) -> bool:
    """`value in options` for plain values only: an array's `==` would answer with an array."""
    return isinstance(value, bool | int | str | bytes) and value in options


class _Global:
    """A recognised global: a name this reader interprets, never a callable."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str) -> None:
        self.kind = kind
        self.name = name


class _DtypeSpec:
    """`numpy.dtype(type_string)` as pickled; its BUILD state may then set the byte order (once)."""

    __slots__ = ("built", "byte_order", "type_string")

    def __init__(self, type_string: str) -> None:
        plain_dtype(type_string)
        self.type_string = type_string
        self.byte_order = "="
        self.built = False

    def dtype(self) -> np.dtype:
        return plain_dtype(self.type_string, self.byte_order)


class _PendingArray:
    """`_reconstruct(ndarray, (0,), b"b")`: shape, dtype and bytes arrive in its BUILD state; until then it
    may sit only on the stack and in the memo (the memo slots are remembered so BUILD can replace them)."""

    __slots__ = ("memo_keys",)

    def __init__(self) -> None:
        self.memo_keys: list[int] = []


class _DataReader:
    """One pass over the opcodes of a stream of `size` bytes; every read is checked against the bytes left
    before it is made (no read allocates more than the file holds) and every allocation is charged."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self.stream = stream
        self.size = size
        self.pos = 0
        self.op_start = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.max_dim = max(size, 1)  # no dimension can be longer than the file has bytes
        self.allocation_left = 2 * size + ALLOCATION_SLACK
        self.handlers = {
            0x80: self.op_proto,
            0x95: self.op_frame,
            ord("("): self.op_mark,
            ord("0"): self.op_pop,
            ord("1"): self.op_pop_mark,
            ord("2"): self.op_dup,
            ord("}"): lambda: self.stack.append({}),
            ord("]"): lambda: self.stack.append([]),
            ord(")"): lambda: self.stack.append(()),
            0x85: lambda: self.op_tuple_n(1),
            0x86: lambda: self.op_tuple_n(2),
            0x87: lambda: self.op_tuple_n(3),
            ord("t"): self.op_tuple,
            ord("l"): self.op_list,
            ord("d"): self.op_dict,
            ord("a"): self.op_append,
            ord("e"): self.op_appends,
            ord("s"): self.op_setitem,
            ord("u"): self.op_setitems,
            ord("N"): lambda: self.stack.append(None),
            0x88: lambda: self.stack.append(True),
            0x89: lambda: self.stack.append(False),
            ord("J"): lambda: self.stack.append(self.take_struct("<i")),
            ord("K"): lambda: self.stack.append(self.take_struct("<B")),
            ord("M"): lambda: self.stack.append(self.take_struct("<H")),
            0x8A: lambda: self.op_long(self.take_struct("<B")),
            0x8B: lambda: self.op_long(self.take_struct("<i")),
            ord("G"): lambda: self.stack.append(self.take_struct(">d")),
            ord("X"): lambda: self.op_unicode(self.take_struct("<I")),
            0x8C: lambda: self.op_unicode(self.take_struct("<B")),
            0x8D: lambda: self.op_unicode(self.take_struct("<Q")),
            ord("B"): lambda: self.stack.append(self.take(self.take_struct("<I"))),
            ord("C"): lambda: self.stack.append(self.take(self.take_struct("<B"))),
            0x8E: lambda: self.stack.append(self.take(self.take_struct("<Q"))),
            0x96: lambda: self.stack.append(bytearray(self.take(self.take_struct("<Q")))),
            ord("T"): lambda: self.op_binstring(self.take_struct("<i")),
            ord("U"): lambda: self.op_binstring(self.take_struct("<B")),
            ord("q"): lambda: self.put(self.take_struct("<B")),
            ord("r"): lambda: self.put(self.take_struct("<I")),
            0x94: lambda: self.put(len(self.memo)),
            ord("h"): lambda: self.get(self.take_struct("<B")),
            ord("j"): lambda: self.get(self.take_struct("<I")),
            ord("c"): self.op_global,
            0x93: self.op_stack_global,
            ord("R"): self.op_reduce,
            ord("b"): self.op_build,
        }

    # ---------------------------------------------------------------------------------------------- reading
    def fail(self, reason: str) -> NoReturn:
        raise PickleDataError(f"{reason} (pickle opcode at byte {self.op_start})")

    def take(self, size: int) -> bytes:
        left = self.size - self.pos
        if size < 0 or size > left:
            self.fail(f"truncated pickle: needs {size} bytes, {left} left")
        chunk = self.stream.read(size)
        if len(chunk) != size:
            self.fail("truncated pickle: the file is shorter than its size (changed while read?)")
        self.pos += size
        return chunk

    def take_struct(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def take_line(self) -> str:
        line = self.stream.readline(min(MAX_GLOBAL_NAME, self.size - self.pos))
        self.pos += len(line)
        if not line.endswith(b"\n"):
            self.fail("truncated or overlong GLOBAL name")
        try:
            return str(line[:-1], "utf-8")
        except UnicodeDecodeError:
            self.fail("GLOBAL name is not UTF-8")

    def charge(self, size: int) -> None:
        self.allocation_left -= size
        if self.allocation_left < 0:
            self.fail(f"the pickle needs more memory than its {self.size} bytes justify")

    def run(self) -> Any:
        if not self.size:
            raise PickleDataError("empty file")
        while True:
            if self.pos >= self.size:
                self.fail("truncated pickle: the stream ends before STOP")
            self.op_start = self.pos
            self.charge(OPCODE_COST)
            code = self.take(1)[0]
            if code == ord("."):
                return self.value(self.pop())
            handler = self.handlers.get(code)
            if handler is None:
                name = _OPCODE_NAMES.get(code)
                if name is None:
                    self.fail(f"invalid pickle opcode {bytes([code])!r}")
                if name in _TEXT_OPCODES:
                    self.fail(
                        f"pickle protocol 0/1 opcode {name} is not read (save with protocol 2 or later)"
                    )
                self.fail(
                    f"unsupported pickle opcode {name}: a weights pickle holds only containers, numbers, "
                    "strings and numpy arrays"
                )
            handler()

    # ---------------------------------------------------------------------------------------------- stack
    def pop(self) -> Any:
        if not self.stack:
            self.fail("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            self.fail("no MARK on the stack")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def top(self, kind: type = object) -> Any:
        if not self.stack:
            self.fail("stack underflow")
        if not isinstance(self.stack[-1], kind):
            self.fail(f"expected a {kind.__name__} on the stack, found a {type(self.stack[-1]).__name__}")
        return self.stack[-1]

    def value(self, item: Any) -> Any:
        """`item` as a container may hold it: dtypes become numpy dtypes, unbuilt arrays are refused."""
        if isinstance(item, _PendingArray):
            self.fail("a numpy array is used before its BUILD state gives it data")
        if isinstance(item, _DtypeSpec):
            return item.dtype()
        return item

    def op_proto(self) -> None:
        protocol = self.take_struct("<B")
        if protocol > 5:
            self.fail(f"unsupported pickle protocol {protocol}")

    def op_frame(self) -> None:
        size = self.take_struct("<Q")
        if size > self.size - self.pos:
            self.fail(f"truncated pickle: frame of {size} bytes")

    def op_mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self) -> None:
        self.pop_mark()

    def op_dup(self) -> None:
        self.stack.append(self.top())

    def put(self, key: int) -> None:
        item = self.top()
        if isinstance(item, _PendingArray):
            item.memo_keys.append(key)
        self.memo[key] = item

    def get(self, key: int) -> None:
        if key not in self.memo:
            self.fail(f"memo key {key} was never stored")
        self.stack.append(self.memo[key])

    # ---------------------------------------------------------------------------------------------- data
    def op_tuple_n(self, count: int) -> None:
        if len(self.stack) < count:
            self.fail("stack underflow")
        items = self.stack[-count:]
        del self.stack[-count:]
        self.stack.append(tuple(self.value(item) for item in items))

    def op_tuple(self) -> None:
        items = self.pop_mark()  # before `self.stack` is read: popping the mark replaces it
        self.stack.append(tuple(self.value(item) for item in items))

    def op_list(self) -> None:
        items = self.pop_mark()
        self.stack.append([self.value(item) for item in items])

    def set_item(self, target: dict[str, Any], key: Any, item: Any) -> None:
        if not isinstance(key, str):
            self.fail(f"dict key of type {type(key).__name__}: weights pickles use string keys")
        target[key] = self.value(item)

    def op_dict(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            self.fail("DICT with an odd number of items")
        target: dict[str, Any] = {}
        for index in range(0, len(items), 2):
            self.set_item(target, items[index], items[index + 1])
        self.stack.append(target)

    def op_append(self) -> None:
        item = self.pop()
        self.top(list).append(self.value(item))

    def op_appends(self) -> None:
        items = self.pop_mark()
        self.top(list).extend(self.value(item) for item in items)

    def op_setitem(self) -> None:
        item = self.pop()
        key = self.pop()
        self.set_item(self.top(dict), key, item)

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            self.fail("SETITEMS with an odd number of items")
        target = self.top(dict)
        for index in range(0, len(items), 2):
            self.set_item(target, items[index], items[index + 1])

    def op_long(self, size: int) -> None:
        if size < 0 or size > MAX_LONG_BYTES:
            self.fail(f"integer of {size} bytes (weights pickles hold small integers)")
        self.stack.append(int.from_bytes(self.take(size), "little", signed=True))

    def op_unicode(self, size: int) -> None:
        try:
            self.stack.append(str(self.take(size), "utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self.fail("string is not UTF-8")

    def op_binstring(self, size: int) -> None:
        """Python 2 `str`: read as latin-1 text, as `pickle.load(encoding="latin1")` does."""
        self.stack.append(str(self.take(size), "latin-1"))

    # ---------------------------------------------------------------------------------------------- globals
    def push_global(self, module: str, name: str) -> None:
        kind = _GLOBAL_KINDS.get((module, name))
        if kind is None:
            self.fail(
                f"refusing to unpickle global '{_shown(module)}.{_shown(name)}': a weights pickle may "
                "contain only dicts, lists and numpy arrays (this file could run code when loaded)"
            )
        self.stack.append(_Global(kind, f"{module}.{name}"))

    def op_global(self) -> None:
        module = self.take_line()
        self.push_global(module, self.take_line())

    def op_stack_global(self) -> None:
        name = self.pop()
        module = self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            self.fail("STACK_GLOBAL needs two strings")
        self.push_global(module, name)

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        if not isinstance(func, _Global):
            self.fail(
                f"REDUCE of a {type(func).__name__}: only numpy's array and dtype constructors are read"
            )
        if not isinstance(args, tuple):
            self.fail(f"REDUCE arguments of {func.name} are not a tuple")
        self.stack.append(self.reduce(func, args))

    def reduce(self, func: _Global, args: tuple[Any, ...]) -> Any:
        """What calling `func(*args)` means for a weights pickle, computed here instead of calling it."""
        if func.kind == "reconstruct":
            if (
                len(args) == 3
                and isinstance(args[0], _Global)
                and args[0].kind == "ndarray"
                and isinstance(args[1], tuple)
                and len(args[1]) == 1
                and _is_one_of(args[1][0], 0)
                and _is_one_of(args[2], b"b", "b")
            ):
                return _PendingArray()
            self.fail(f"{func.name} with arguments numpy never writes (only (ndarray, (0,), b'b') is read)")
        if func.kind == "dtype":
            if (
                len(args) == 3
                and isinstance(args[0], str)
                and _is_one_of(args[1], 0, 1)
                and _is_one_of(args[2], 0, 1)
            ):
                try:
                    return _DtypeSpec(args[0])
                except PickleDataError as exc:
                    self.fail(str(exc))
            self.fail("numpy.dtype with arguments numpy never writes (expected (type string, align, copy))")
        if func.kind == "scalar":
            if len(args) != 2 or not isinstance(args[0], np.dtype):
                self.fail(f"{func.name} expects (dtype, bytes)")
            raw = self.raw_bytes(args[1])
            if len(raw) != args[0].itemsize:
                self.fail(f"numpy scalar of dtype {args[0]} given {len(raw)} bytes")
            return self.array(raw, args[0], ()).reshape(())[()]
        if func.kind == "frombuffer":
            if len(args) != 4 or not _is_one_of(args[3], "C", "F"):
                self.fail(f"{func.name} expects (buffer, dtype, shape, 'C' or 'F')")
            buffer, dtype, shape, order = args
            return self.array(self.raw_bytes(buffer, encode=False), dtype, shape, fortran=order == "F")
        if func.kind == "encode":
            if len(args) != 2 or not isinstance(args[0], str) or not _is_one_of(args[1], "latin1", "latin-1"):
                self.fail(f"{func.name} is read only as (text, 'latin1'), the way pickle stores bytes")
            return self.raw_bytes(args[0])
        if func.kind == "bytes":
            if args:
                self.fail(f"{func.name} is read only without arguments (an empty bytes value)")
            return b""
        if func.kind == "ordered_dict":
            target: dict[str, Any] = {}
            if args == ():
                return target
            if len(args) == 1 and isinstance(args[0], list):
                for pair in args[0]:
                    if not isinstance(pair, list | tuple) or len(pair) != 2:
                        self.fail("OrderedDict items are not (key, value) pairs")
                    self.set_item(target, pair[0], pair[1])
                return target
            self.fail("OrderedDict with arguments pickle never writes")
        self.fail(f"refusing to call {func.name}: it is read only as an argument of numpy's _reconstruct")

    # ---------------------------------------------------------------------------------------------- numpy
    def raw_bytes(self, raw: Any, *, encode: bool = True) -> bytes | bytearray:
        """Array or scalar bytes: bytes, bytearray, or latin-1 text (protocol 2 and Python 2 pickles)."""
        if isinstance(raw, bytes | bytearray):
            return raw
        if encode and isinstance(raw, str):
            self.charge(len(raw))
            try:
                return raw.encode("latin-1")
            except UnicodeEncodeError:
                self.fail("array bytes given as text outside latin-1")
        self.fail(f"array bytes given as a {type(raw).__name__}")

    def shape(self, shape: Any) -> tuple[int, ...]:
        if not isinstance(shape, tuple) or len(shape) > MAX_NDIM:
            self.fail(f"array shape must be a tuple of at most {MAX_NDIM} dimensions")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= self.max_dim:
                shown = str(dim) if isinstance(dim, int) else f"of type {type(dim).__name__}"
                self.fail(f"array dimension {shown} is not an integer in 0..{self.max_dim} (the file size)")
        return shape

    def array(self, raw: bytes | bytearray, dtype: Any, shape: Any, fortran: bool = False) -> np.ndarray:
        """A fresh array from `raw`, allocated only after its size is checked against the bytes given."""
        if not isinstance(dtype, np.dtype):
            self.fail(f"array dtype given as a {type(dtype).__name__}")
        shape = self.shape(shape)
        count = math.prod(shape)
        if count * dtype.itemsize != len(raw):
            self.fail(
                f"array of shape {list(shape)} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                f"the pickle gives {len(raw)}"
            )
        self.charge(len(raw))
        order = "F" if fortran else "C"
        if dtype.kind == "b":  # any non-zero byte is True: no bool array holds other byte values
            return (np.frombuffer(raw, dtype=np.uint8, count=count) != 0).reshape(shape, order=order)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order).copy(order="K")

    def op_build(self) -> None:
        state = self.pop()
        target = self.top()
        if isinstance(target, _DtypeSpec):
            self.build_dtype(target, state)
        elif isinstance(target, _PendingArray):
            built = self.build_array(state)
            self.stack[-1] = built
            for key in target.memo_keys:
                if self.memo.get(key) is target:
                    self.memo[key] = built
        else:
            self.fail(f"BUILD on a {type(target).__name__}: only numpy arrays and dtypes take a state")

    def build_dtype(self, spec: _DtypeSpec, state: Any) -> None:
        """numpy's dtype state `(3, byte order, None, None, None, elsize, alignment, flags[, None])`:
        only the byte order is used; fields, subarrays and metadata are refused, flags are ignored."""
        if spec.built:
            self.fail("a numpy dtype given a second BUILD state")
        if (
            not isinstance(state, tuple)
            or len(state) not in (8, 9)
            or not _is_one_of(state[0], 3, 4)
            or any(item is not None for item in state[2:5] + state[8:])
            or not all(isinstance(item, int) for item in state[5:8])
        ):
            self.fail(f"numpy dtype '{spec.type_string}' with a state other than a plain number type's")
        if not isinstance(state[1], str):
            self.fail("numpy dtype byte order is not a string")
        spec.byte_order = state[1]
        try:
            spec.dtype()
        except PickleDataError as exc:
            self.fail(str(exc))
        spec.built = True

    def build_array(self, state: Any) -> np.ndarray:
        """numpy's array state `(1, shape, dtype, is_fortran, rawdata)` (older: without the version)."""
        if isinstance(state, tuple) and len(state) == 5 and _is_one_of(state[0], 1):
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4 or not _is_one_of(state[2], 0, 1):
            self.fail("numpy array state is not (version, shape, dtype, is_fortran, rawdata)")
        shape, dtype, fortran, raw = state
        return self.array(self.raw_bytes(raw), dtype, shape, fortran=bool(fortran))


def load_pickle_data(stream: BinaryIO, size: int) -> Any:
    """The value a weights pickle of `size` bytes stores: dicts (string keys), lists, tuples, str, bytes, int,
    float, bool, None, numpy dtypes, scalars and arrays of plain numeric types. Anything else raises
    `PickleDataError`; no more memory than about twice `size` is ever asked for."""
    return _DataReader(stream, size).run()


def loads_pickle_data(data: bytes) -> Any:
    """`load_pickle_data` of an in-memory pickle."""
    return load_pickle_data(io.BytesIO(data), len(data))
