"""Read torch.save files and TorchScript archives without torch and without running anything they contain.

A restricted unpickler builds tensors (as numpy arrays over the archive's storages, memory-mapped), storages,
plain containers and a few inert values; every other global is refused. What a file declares (storage sizes,
tensor extents, pickle lengths and memo indices) is checked against the file's real size before anything is
allocated, so a small crafted file cannot take much memory.

Length: one security boundary (the unpickler, its allow-list and the size checks it relies on) kept in one file
so that it can be reviewed as a whole.
"""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import pickletools
import struct
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from resnet_flax.errors import WeightsError

MAX_PICKLE_BYTES = 64 << 20  # a ResNet's data.pkl is ~30 KB; Lightning/timm extras stay far below this
MAX_NDIM = 32
# torch.save's pickler appends and sets items in batches of 1000, so a state dict never needs more than a few
# thousand objects on the unpickler's stack; deeper means containers nested to build memory (~100 bytes each).
MAX_PICKLE_STACK = 100_000
# Tensors may view a storage more than once (tied weights, {"model": sd, "ema": sd}); beyond this many bytes of
# tensors per byte of file, the file describes data it does not hold.
MAX_TENSOR_BYTES_PER_FILE_BYTE = 4
TENSOR_BYTES_SLACK = 16 << 20

STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
    "UInt16Storage": np.dtype(np.uint16), "UInt32Storage": np.dtype(np.uint32),
    "UInt64Storage": np.dtype(np.uint64), "UntypedStorage": np.dtype(np.uint8),
    "Float8_e4m3fnStorage": np.dtype(ml_dtypes.float8_e4m3fn), "Float8_e5m2Storage": np.dtype(ml_dtypes.float8_e5m2),
}
# torch dtypes by name (pickled as globals ``torch.float32`` ...), for _rebuild_tensor_v3 and inert metadata.
TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128), "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
# TorchScript's typed containers: inert wrappers around lists (build_tensor_from_id is not among them).
SCRIPT_LISTS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_genericlist",
                "restore_type_tag"}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# Opcodes a torch.save pickle never uses and that reach further than building values.
REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "INST", "OBJ", "PERSID"}
PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}


class Refused(WeightsError):
    """The file references code (a global outside the allow-list); it is never imported or called."""


class Namespace(types.SimpleNamespace):
    """An inert stand-in for ``argparse.Namespace`` (timm training checkpoints keep their args in one)."""


class ScriptObject:
    """An inert TorchScript object (a module): its class name and attributes, no code."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise Refused(f"the TorchScript object {type(self).__qualname__} has custom state that only running "
                          "its __setstate__ could rebuild")
        self.attrs = state


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _TorchDtype(str):
    """A torch dtype named in a pickle (``"torch.float32"``): an inert string that knows its numpy dtype."""

    def __new__(cls, name: str) -> _TorchDtype:
        self = super().__new__(cls, f"torch.{name}")
        self.np = TORCH_DTYPES[name]
        return self


class _Storage:
    """One storage record of the archive: raw bytes (``None`` until bound, in the legacy format)."""

    def __init__(self, key: str, raw: np.ndarray | None, dtype: np.dtype):
        self.key, self.raw, self.dtype = key, raw, dtype


class _StorageRef:
    def __init__(self, storage: _Storage, dtype: np.dtype, numel: int):
        self.storage, self.dtype, self.numel = storage, dtype, numel


class _Lazy:
    """A tensor as the pickle describes it; :func:`_bind` checks it against its storage and makes the array."""

    def __init__(self, ref: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.ref, self.offset, self.size, self.stride = ref, offset, size, stride


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Reader:
    """State shared by the unpickler callbacks of one file: its storages."""

    def __init__(self, path: Path, file_size: int, storage: Callable[[str, int, np.dtype], _Storage],
                 big_endian: bool):
        self.path, self.file_size, self.storage, self.big_endian = path, file_size, storage, big_endian
        self.storages: dict[str, _Storage] = {}

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[3], str)
                and _int(pid[4]) and pid[4] >= 0):
            raise WeightsError(f"{self.path}: unknown persistent record {str(pid)[:80]!r}; not a torch.save file")
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsError(f"{self.path}: storage views from PyTorch < 0.4 are not read; "
                               "re-save the checkpoint with a recent torch")
        stype, key, numel = pid[1], pid[2], pid[4]
        if key not in self.storages:
            self.storages[key] = self.storage(key, numel * stype.dtype.itemsize, stype.dtype)
        return _StorageRef(self.storages[key], stype.dtype, numel)

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _Lazy:
        if not isinstance(storage, _StorageRef):
            raise WeightsError(f"{self.path}: a tensor without a storage; not a torch.save file")
        if not (_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
                and len(size) == len(stride) <= MAX_NDIM and all(_int(s) and s >= 0 for s in size + stride)):
            raise WeightsError(f"{self.path}: a tensor with invalid offset/size/stride; the file is corrupt")
        return _Lazy(storage, offset, size, stride)

    def rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                          hooks: Any = None, dtype: Any = None, *_rest: Any) -> _Lazy:
        """torch's rebuild for an untyped (byte) storage viewed with ``dtype`` (float8, uint16, ...)."""
        if not (isinstance(storage, _StorageRef) and isinstance(dtype, _TorchDtype)):
            raise WeightsError(f"{self.path}: a tensor without a storage or dtype; not a torch.save file")
        nbytes = storage.numel * storage.dtype.itemsize
        typed = _StorageRef(storage.storage, dtype.np, nbytes // dtype.np.itemsize)
        return self.rebuild_tensor(typed, offset, size, stride)


def _bind(obj: Any, reader: _Reader) -> Any:
    """``obj`` with every tensor made a read-only array over its storage, after checking what it declares."""
    budget = MAX_TENSOR_BYTES_PER_FILE_BYTE * reader.file_size + TENSOR_BYTES_SLACK
    path = reader.path
    done: dict[int, Any] = {}

    def array(t: _Lazy) -> np.ndarray:
        nonlocal budget
        ref = t.ref
        raw = ref.storage.raw
        nbytes = ref.numel * ref.dtype.itemsize
        if raw is None or nbytes > raw.size:
            have = 0 if raw is None else raw.size
            raise WeightsError(f"{path}: storage {ref.storage.key} declares {nbytes} bytes but the file holds "
                               f"{have}; the file is truncated or crafted")
        numel = 1
        for n in t.size:
            numel *= n
        if numel:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
            if last >= ref.numel:
                raise WeightsError(f"{path}: a tensor of size {list(t.size)} reaches element {last} of a "
                                   f"{ref.numel}-element storage; the file is truncated or crafted")
        budget -= numel * ref.dtype.itemsize
        if budget < 0:
            raise WeightsError(f"{path}: its tensors would take far more memory than the file's size "
                               "(views repeating the same storage); refused as crafted")
        flat = raw[:nbytes].view(ref.dtype)
        if reader.big_endian:
            flat = flat.byteswap()  # a copy in native order; files written on big-endian machines are rare
        item = ref.dtype.itemsize
        return np.lib.stride_tricks.as_strided(flat[t.offset:] if numel else flat[:0], shape=t.size,
                                               strides=tuple(s * item for s in t.stride), writeable=False)

    def walk(o: Any) -> Any:
        if isinstance(o, _Lazy):
            if id(o) not in done:
                done[id(o)] = array(o)
            return done[id(o)]
        if isinstance(o, str | bytes | int | float | complex | bool | type(None) | np.ndarray):
            return o
        if id(o) in done:
            return done[id(o)]
        if isinstance(o, dict):
            done[id(o)] = o
            for k in list(o):
                o[k] = walk(o[k])
        elif isinstance(o, list):
            done[id(o)] = o
            o[:] = [walk(v) for v in o]
        elif isinstance(o, tuple):
            done[id(o)] = o
            done[id(o)] = tuple(walk(v) for v in o)
        elif isinstance(o, set | frozenset):
            done[id(o)] = type(o)(walk(v) for v in o)
        elif isinstance(o, Namespace):
            done[id(o)] = o
            for k, v in list(vars(o).items()):
                setattr(o, k, walk(v))
        elif isinstance(o, ScriptObject):
            done[id(o)] = o
            o.attrs = {k: walk(v) for k, v in o.attrs.items()}
        return done.get(id(o), o)

    try:
        return walk(obj)
    except RecursionError:
        raise WeightsError(f"{path}: containers nested too deeply; crafted or corrupt") from None


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode is accepted only as pickle's own bytes encoding (latin1)")
    return text.encode("latin1")


def _torch_size(*args: Any) -> tuple:
    dims = args[0] if args else ()
    if not (isinstance(dims, tuple | list) and all(_int(d) for d in dims)):
        raise WeightsError("a torch.Size of non-integers; the file is corrupt")
    return tuple(dims)


def _torch_device(*args: Any) -> str:
    if not all(isinstance(a, str | int) for a in args):
        raise WeightsError("a torch.device of unexpected values; the file is corrupt")
    return ":".join(str(a) for a in args)


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args and not isinstance(args[0], list | tuple | dict):
        raise WeightsError("an OrderedDict built from something other than items; the file is corrupt")
    return collections.OrderedDict(*args[:1])


def _script_list(items: Any) -> list:
    if not isinstance(items, list):
        raise WeightsError("a TorchScript typed list built from something other than a list; corrupt archive")
    return items


def _restore_type_tag(value: Any, _type_str: Any = None) -> Any:
    return value


def _plain(kind: type) -> Callable[..., Any]:
    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], list | tuple | set | frozenset | str | bytes):
            raise WeightsError(f"a {kind.__name__} built from a {type(args[0]).__name__}; the file is corrupt")
        return kind(*args[:1])
    return build


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, reader: _Reader, script: bool):
        super().__init__(io.BytesIO(data))
        self.reader, self.script = reader, script
        self.script_classes: dict[str, type] = {}
        rebuild = reader.rebuild_tensor
        self.allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): _ordered_dict,
            ("torch._utils", "_rebuild_tensor"): rebuild,
            ("torch._utils", "_rebuild_tensor_v2"): rebuild,
            ("torch._utils", "_rebuild_tensor_v3"): reader.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch", "Size"): _torch_size,
            ("torch", "device"): _torch_device,
            ("argparse", "Namespace"): Namespace,
            ("_codecs", "encode"): _codecs_encode,
            ("builtins", "set"): _plain(set),
            ("builtins", "frozenset"): _plain(frozenset),
        }

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2 names builtins as Python 2 did
            module = "builtins"
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in TORCH_DTYPES:
            return _TorchDtype(name)
        if self.script and module == "torch.jit._pickle" and name in SCRIPT_LISTS:
            return _script_list if name != "restore_type_tag" else _restore_type_tag
        if self.script and (module == "__torch__" or module.startswith("__torch__.")):
            qual = f"{module}.{name}"
            if qual not in self.script_classes:
                self.script_classes[qual] = type(name, (ScriptObject,), {"__qualname__": qual})
            return self.script_classes[qual]
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return self.reader.persistent_load(pid)


def _scan(data: bytes | mmap.mmap, path: Path, start: int = 0) -> int:
    """Check one pickle's opcodes before unpickling (declared lengths exist, memo indices are sane, nothing
    exotic); returns the position after its STOP. The C unpickler would allocate what a length or memo index
    declares before noticing the file is shorter."""
    f = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
    f.seek(start)
    puts, stack, marks = 0, 0, []
    try:
        for op, arg, _pos in pickletools.genops(f):
            before = op.stack_before
            if op.name == "MARK":
                marks.append(stack)
            elif pickletools.markobject in before:
                if not marks:
                    raise WeightsError(f"{path}: a pickle that pops a mark it never set; crafted or corrupt")
                stack = marks.pop() - before.index(pickletools.markobject) + len(op.stack_after)
            else:
                stack += len(op.stack_after) - len(before)
            if stack + len(marks) > MAX_PICKLE_STACK:
                raise WeightsError(f"{path}: a pickle holding over {MAX_PICKLE_STACK} objects at once (nested "
                                   "containers built to exhaust memory?); refused as crafted")
            if op.name in REFUSED_OPCODES:
                raise Refused(f"pickle opcode {op.name}")
            if op.name in PUT_OPCODES:
                if arg > puts:
                    raise WeightsError(f"{path}: a pickle memo index of {arg} after {puts} entries; "
                                       "the file is crafted or corrupt")
                puts += 1
            elif op.name == "MEMOIZE":
                puts += 1
            elif op.name == "FRAME" and arg > len(data) - f.tell():
                raise WeightsError(f"{path}: a pickle frame longer than the file; truncated or crafted")
    except WeightsError:
        raise
    except (ValueError, IndexError) as e:  # genops: truncated data, unknown opcode, missing STOP
        raise WeightsError(f"{path}: truncated or corrupt pickle ({e})") from None
    return f.tell()


def _unpickle(data: bytes, reader: _Reader, script: bool = False) -> Any:
    if len(data) > MAX_PICKLE_BYTES:
        raise WeightsError(f"{reader.path}: its pickle is {len(data)} bytes, over the {MAX_PICKLE_BYTES} "
                           "this reader accepts; a weights file needs far less")
    _scan(data, reader.path)
    try:
        return _Unpickler(data, reader, script).load()
    except WeightsError:
        raise
    except RecursionError:
        raise WeightsError(f"{reader.path}: a pickle nested too deeply; crafted or corrupt") from None
    except Exception as e:
        raise WeightsError(f"{reader.path}: truncated or corrupt checkpoint ({type(e).__name__}: "
                           f"{str(e)[:120]})") from None


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def load(path: str | Path) -> Any:
    """The object a torch.save file holds (zip or legacy format), tensors as read-only numpy arrays.

    A TorchScript archive gives its root module as a :class:`ScriptObject`; see :func:`script_tensors`.
    """
    path = Path(path)
    mm = _map(path)
    if mm[:2] == b"PK":
        return _load_zip(path, mm)
    if len(mm) > 262 and mm[257:262] == b"ustar":
        raise WeightsError(f"{path}: a tar checkpoint from PyTorch < 0.4 is not read; "
                           "re-save it with torch.save(torch.load(path), new_path) in a recent torch")
    return _load_legacy(path, mm)


def _load_zip(path: Path, mm: mmap.mmap) -> Any:
    try:
        z = zipfile.ZipFile(path)  # the central directory; storages are then mapped straight from ``mm``
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{path}: a damaged zip archive (truncated download?) ({e}); "
                           "download or save the checkpoint again") from None
    with z:
        infos = {i.filename: i for i in z.infolist()}
        pkls = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pkls:
            if any(n.endswith(("/archive_format", "/models/model.json", "serialized_exported_program.json"))
                   for n in infos):
                raise WeightsError(f"{path}: an unsupported torch.export archive (.pt2): it holds a program, not "
                                   "a state dict; save the model's state_dict() with torch.save instead")
            raise WeightsError(f"{path}: a zip archive without data.pkl: not a torch.save file or TorchScript "
                               "archive")
        prefix = pkls[0][: -len("data.pkl")]
        script = f"{prefix}constants.pkl" in infos
        if script:
            for name, info in infos.items():
                if name.startswith(f"{prefix}code/") and name.endswith(".py") and info.file_size < MAX_PICKLE_BYTES \
                        and b"def __setstate__" in z.read(name):
                    raise Refused(f"a TorchScript __setstate__ ({name[len(prefix):]})")
        byteorder = z.read(f"{prefix}byteorder").strip() if f"{prefix}byteorder" in infos else b"little"
        if byteorder not in (b"little", b"big"):
            raise WeightsError(f"{path}: byteorder {byteorder[:20]!r} is neither little nor big; corrupt file")
        info = infos[pkls[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            raise WeightsError(f"{path}: its pickle is {info.file_size} bytes, over the {MAX_PICKLE_BYTES} "
                               "this reader accepts; a weights file needs far less")
        try:
            data = z.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise WeightsError(f"{path}: truncated or corrupt checkpoint ({e})") from None

        def storage(key: str, nbytes: int, dtype: np.dtype) -> _Storage:
            name = f"{prefix}data/{key}"
            member = infos.get(name)
            if member is None or "/" in key or key in ("", ".", ".."):
                raise WeightsError(f"{path}: storage {key[:40]!r} is missing from the archive; truncated or corrupt")
            if member.compress_type != zipfile.ZIP_STORED:
                raise WeightsError(f"{path}: storage {key} is compressed, which torch.save never writes; "
                                   "re-save the checkpoint with torch.save")
            if nbytes > member.file_size:
                raise WeightsError(f"{path}: storage {key} declares {nbytes} bytes but the archive holds "
                                   f"{member.file_size}; the file is truncated or crafted")
            start = member.header_offset
            head = mm[start:start + 30]
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise WeightsError(f"{path}: storage {key} has a damaged zip header; truncated or corrupt")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            begin = start + 30 + name_len + extra_len
            if begin + member.file_size > len(mm):
                raise WeightsError(f"{path}: storage {key} runs past the end of the file; truncated download?")
            return _Storage(key, np.frombuffer(mm, np.uint8, member.file_size, begin), dtype)

        reader = _Reader(path, len(mm), storage, big_endian=byteorder == b"big")
        return _bind(_unpickle(data, reader, script=script), reader)


def _load_legacy(path: Path, mm: mmap.mmap) -> Any:
    """The pre-1.6 format: magic, protocol and system-info pickles, the object, the storage keys, raw storages."""
    ends = [0]
    for _ in range(5):
        if ends[-1] >= len(mm):
            raise WeightsError(f"{path}: truncated or corrupt checkpoint (it ends after {len(ends) - 1} of the "
                               "5 pickles of a torch.save file)")
        ends.append(_scan(mm, path, ends[-1]))
    reader = _Reader(path, len(mm), lambda key, nbytes, dtype: _Storage(key, None, dtype), big_endian=False)

    def small(i: int) -> Any:
        return _unpickle(mm[ends[i]:ends[i + 1]], reader)

    if small(0) != LEGACY_MAGIC:
        raise WeightsError(f"{path}: not a torch.save file (neither a zip archive nor the legacy magic number)")
    info = small(2)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise WeightsError(f"{path}: a legacy checkpoint written on a big-endian machine is not read; "
                           "re-save it with a recent torch")
    keys = small(4)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise WeightsError(f"{path}: corrupt storage list in a legacy checkpoint")
    # Storages follow in the listed order, each as an int64 element count then the raw elements; their element
    # sizes are only known from the object pickle, so read it first with placeholders, then bind the bytes.
    obj = _unpickle(mm[ends[3]:ends[4]], reader)
    pos = ends[5]
    for key in keys:
        st = reader.storages.get(key)
        if st is None:
            raise WeightsError(f"{path}: storage {key} is listed but never used; corrupt checkpoint")
        if pos + 8 > len(mm):
            raise WeightsError(f"{path}: truncated checkpoint (storage {key} is missing)")
        (count,) = struct.unpack("<q", mm[pos:pos + 8])
        nbytes = count * st.dtype.itemsize
        if count < 0 or pos + 8 + nbytes > len(mm):
            raise WeightsError(f"{path}: storage {key} declares {count} elements, more than the file holds; "
                               "truncated or crafted")
        st.raw = np.frombuffer(mm, np.uint8, nbytes, pos + 8)
        pos += 8 + nbytes
    missing = [k for k, s in reader.storages.items() if k not in set(keys)]
    if missing:
        raise WeightsError(f"{path}: storage {missing[0]} is used but not stored; corrupt checkpoint")
    return _bind(obj, reader)


def script_tensors(root: ScriptObject) -> dict[str, Any]:
    """A TorchScript module's tensors named like its ``state_dict()`` (``layer1.0.conv1.weight``)."""
    out: dict[str, Any] = {}

    def walk(obj: ScriptObject, prefix: str, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen = seen | {id(obj)}
        for name, value in obj.attrs.items():
            if isinstance(value, ScriptObject):
                walk(value, f"{prefix}{name}.", seen)
            elif isinstance(value, np.ndarray):
                out[f"{prefix}{name}"] = value

    walk(root, "", set())
    return out
