"""Writes PyTorch state-dict files without torch (both formats cbir_jax.backbones.torch_pickle reads), so
tests can hand-build checkpoints, including malformed ones. `torch.load` reads what it writes."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Mapping

import numpy as np

from cbir_jax.backbones.torch_pickle import _STORAGE_DTYPES, LEGACY_MAGIC, LEGACY_PROTOCOL_VERSION



class _Global:
    """A reference to a torch global, written by name; torch itself is never imported."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # save_reduce insists on a callable
        raise TypeError("placeholder only")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = _Global("collections", "OrderedDict")
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items() if name != "UntypedStorage"}


class _WrittenStorage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


class _Writer(pickle._Pickler):  # the pure-Python pickler lets us emit globals by name
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Global] = _save_global

    def __init__(self, file: BinaryIO, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy
        self.storages: list[_WrittenStorage] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _WrittenStorage):
            name = _STORAGE_NAMES[obj.array.dtype]
            pid = ("storage", _Global("torch", name), obj.key, "cpu", obj.array.size)
            return pid + (None,) if self.legacy else pid  # legacy ids carry view metadata
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            array = np.asarray(obj, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            if array.dtype not in _STORAGE_NAMES:
                raise TypeError(f"no torch storage type for dtype {array.dtype}")
            storage = _WrittenStorage(str(len(self.storages)), array)
            self.storages.append(storage)
            stride = tuple(s // array.itemsize for s in array.strides) if array.ndim else ()
            hooks = _Reduced(_ORDERED_DICT, ())
            return _REBUILD, (storage, 0, tuple(array.shape), stride, False, hooks)
        if isinstance(obj, _Reduced):
            return obj.func, obj.args
        if isinstance(obj, collections.OrderedDict):
            return _ORDERED_DICT, (), None, None, iter(obj.items())
        return NotImplemented


class _Reduced:
    def __init__(self, func: _Global, args: tuple) -> None:
        self.func, self.args = func, args


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike, legacy: bool = False) -> None:
    """Writes name -> array as a PyTorch state dict (zip format, or the legacy format if `legacy`)."""
    path = os.fspath(path)
    body = io.BytesIO()
    writer = _Writer(body, legacy)
    writer.dump(collections.OrderedDict((str(k), np.asarray(v)) for k, v in state_dict.items()))
    if legacy:
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC, LEGACY_PROTOCOL_VERSION,
                           {"protocol_version": LEGACY_PROTOCOL_VERSION, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
                pickle.dump(header, f, protocol=2)
            f.write(body.getvalue())
            pickle.dump([s.key for s in writer.storages], f, protocol=2)
            for s in writer.storages:
                f.write(struct.pack("<q", s.array.size))
                f.write(s.array.tobytes())
        return
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", body.getvalue())
        zf.writestr(f"{prefix}/byteorder", "little")
        for s in writer.storages:
            zf.writestr(f"{prefix}/data/{s.key}", s.array.tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
