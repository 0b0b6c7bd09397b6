"""Reads PyTorch state-dict files without importing torch.

Why: the library must run where torch is not installed, and a `.pth` file is a pickle, which can run any
code when loaded naively. Only the handful of globals a state dict needs are allowed; everything else
raises `UnsafeCheckpointError` before it is constructed, so loading never executes code from the file.

Both serialisation formats are read:
- zip (torch >= 1.6 default): `<prefix>/data.pkl` plus one raw file per storage under `<prefix>/data/`;
- legacy (`_use_new_zipfile_serialization=False`): five consecutive pickles (magic number, protocol
  version, system info, the object, the list of storage keys), then each storage as an int64 element
  count followed by its raw bytes.

tests/torch_writer.py writes such files, so tests hand-build checkpoints without torch.
"""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping

import ml_dtypes
import numpy as np

from cbir_jax.core.errors import MissingFileError, UserError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001


class CheckpointFileError(UserError, ValueError):
    """A weights file that is corrupt, truncated or not a state dict; its message is one line."""


class UnsafeCheckpointError(CheckpointFileError):
    """A checkpoint holds something a plain state dict never holds (possibly code); it was not loaded."""


# Storage class name -> numpy dtype of its elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}
# torch dtype globals (used by _rebuild_tensor_v3) -> the storage name with that element type.
_TORCH_DTYPES: dict[str, str] = {
    "float64": "DoubleStorage",
    "float32": "FloatStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "int64": "LongStorage",
    "int32": "IntStorage",
    "int16": "ShortStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "bool": "BoolStorage",
}


class _Sealed:
    """Objects the pickle may reference but never modify (its BUILD opcode would call __setstate__).

    Several are shared by every load, so a file must not be able to change them for the next one.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"checkpoint tries to set the state of {type(self).__name__}")


class _Call(_Sealed):
    """An allow-listed torch function, as a sealed callable."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _StorageType(_Sealed):
    """Stands in for `torch.FloatStorage` & co.: only carries the element dtype; read-only once made.

    Each load builds its own (see `_allowed_globals`), so even a bug here cannot leak into the next load.
    """

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name])

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafeCheckpointError(f"checkpoint tries to modify the storage type {self.name}")


class _Storage(_Sealed):
    """A storage whose bytes may arrive after the pickle that references it (legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None
        self.view_of: tuple[_Storage, int] | None = None  # (root, element offset) for legacy views

    def array(self) -> np.ndarray:
        if self.view_of is not None:
            root, offset = self.view_of
            return root.array()[offset : offset + self.numel]
        if self.data is None:
            raise CheckpointFileError("checkpoint is truncated: a storage's data is missing")
        return self.data


class _LazyTensor(_Sealed):
    """A tensor view on a `_Storage`, materialised once every storage has been read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.array()
        ints = all(isinstance(v, int) and v >= 0 for v in (*self.size, *self.stride))
        if not ints or len(self.size) != len(self.stride):  # as_strided must never leave the buffer
            raise CheckpointFileError("checkpoint is corrupt: a tensor has invalid sizes or strides")
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.size:
            raise CheckpointFileError("checkpoint is corrupt: a tensor reaches outside its storage")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * item for s in self.stride], writeable=False
        )
        return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _LazyTensor:
    """torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata do not matter for inference."""
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("tensor built from something other than a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_ignored):
    """torch._utils._rebuild_tensor_v3: the dtype travels with the tensor instead of the storage."""
    if not isinstance(dtype, _StorageType):
        raise UnsafeCheckpointError("tensor dtype is not a torch dtype")
    if not isinstance(storage, _Storage):  # checked before the write: never retype a shared object
        raise UnsafeCheckpointError("tensor built from something other than a storage")
    storage.dtype = dtype.dtype
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, *_ignored) -> Any:
    """torch._utils._rebuild_parameter(_with_state): a Parameter is just its tensor here."""
    return data


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list, built afresh for every load: no object a file can reach outlives that load."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Call(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v3"): _Call(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Call(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Call(_rebuild_parameter),
    }
    allowed.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
    allowed.update({("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage")})
    allowed.update({("torch", d): _StorageType(s) for d, s in _TORCH_DTYPES.items()})
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from `storages` keyed by their id in the file."""

    def __init__(self, file: BinaryIO, source: str, storages: dict[str, _Storage], read_storage) -> None:
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._allowed = _allowed_globals()
        self._storages = storages
        self._read_storage = read_storage  # (key, dtype, numel) -> _Storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load {self._source}: it references {module}.{name}, which is not part of a "
                "plain PyTorch state dict"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"refusing to load {self._source}: unknown persistent id {pid!r:.60}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"refusing to load {self._source}: storage type is not a torch storage")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, int(numel))
        storage = self._storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return storage
        view_key, offset, view_numel = view  # legacy storage views: a slice of the root storage
        if view_key not in self._storages:
            sub = _Storage(storage_type.dtype, int(view_numel))
            sub.view_of = (storage, int(offset))
            self._storages[view_key] = sub
        return self._storages[view_key]


def _resolve(obj: Any) -> Any:
    """Replaces every lazy tensor inside dicts, lists and tuples by its numpy array."""
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _byteswapped(dtype: np.dtype, little: bool) -> np.dtype:
    return dtype if little else dtype.newbyteorder(">")


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointFileError(f"{path} is a zip file but not a PyTorch checkpoint (no <prefix>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = zf.read(prefix + "byteorder").decode().strip() == "little"

        # Bytes are attached after unpickling: a v3 tensor sets its storage's dtype only when rebuilt.
        storages: dict[str, _Storage] = {}
        with zf.open(pkl[0]) as f:
            obj = _SafeUnpickler(f, path, storages, lambda key, dtype, numel: _Storage(dtype, numel)).load()
        for key, storage in storages.items():
            if storage.view_of is None:
                raw = zf.read(f"{prefix}data/{key}")
                storage.data = np.frombuffer(raw, _byteswapped(storage.dtype, little)).astype(
                    storage.dtype, copy=False
                )
    return _resolve(obj)


def _load_legacy(path: str) -> Any:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = _SafeUnpickler(f, path, {}, None)
        if header.load() != LEGACY_MAGIC:
            raise CheckpointFileError(f"{path} is not a PyTorch checkpoint (bad magic number)")
        if header.load() != LEGACY_PROTOCOL_VERSION:
            raise CheckpointFileError(f"{path}: unsupported legacy PyTorch protocol version")
        sys_info = header.load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: dict[str, _Storage] = {}
        obj = _SafeUnpickler(f, path, storages, lambda key, dtype, numel: _Storage(dtype, numel)).load()
        keys = _SafeUnpickler(f, path, {}, None).load()
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
            nbytes = numel * storage.dtype.itemsize
            if not 0 <= nbytes <= size - f.tell():  # never ask the OS for more than the file holds
                raise CheckpointFileError(f"{path} is truncated")
            raw = f.read(nbytes)
            storage.numel = numel
            storage.data = np.frombuffer(raw, _byteswapped(storage.dtype, little)).astype(storage.dtype, copy=False)
    return _resolve(obj)


def load(path: str | os.PathLike) -> Any:
    """Loads a `torch.save`d object made of dicts, lists, tuples, scalars and tensors (as numpy arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no checkpoint file at {path}")
    try:
        return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except CheckpointFileError:
        raise
    except OSError as error:  # the file itself could not be read: name it, as every I/O error
        raise CheckpointFileError(f"{path}: cannot read ({error.strerror or error})") from error
    except Exception as error:  # malformed pickles fail in many ways; none of them runs file code
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200] if str(error) else type(error).__name__
        raise CheckpointFileError(f"{path} is not a valid PyTorch checkpoint: {reason}") from error


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a state dict (name -> tensor) as numpy arrays; a {"state_dict": ...} wrapper is unwrapped."""
    obj = load(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()
    ):
        raise CheckpointFileError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)
