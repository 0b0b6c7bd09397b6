"""The torch-free checkpoint reader: exact round trips in both formats, and refusal of anything else."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from cbir_jax.backbones import torch_pickle
from torch_writer import save_state_dict


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        conv=rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        transposed=np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous input
        scalar=np.array(7, np.int64),  # like BatchNorm's num_batches_tracked
        half=rng.normal(size=5).astype(np.float16),
        bf16=np.arange(6).astype(ml_dtypes.bfloat16),
        double=rng.normal(size=(2, 2)),
        ints=np.arange(-3, 3, dtype=np.int32),
        mask=np.array([True, False, True]),
        empty=np.zeros((0, 3), np.float32),
    )


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("legacy", [False, True])
def test_round_trip(tmp_path, legacy):
    path = tmp_path / "sd.pth"
    save_state_dict(_sample(), path, legacy=legacy)
    assert zipfile.is_zipfile(path) != legacy
    _assert_same(torch_pickle.load_state_dict(path), _sample())


def _hand_built_pickle() -> bytes:
    """data.pkl of {'w': float32 tensor [[1,2],[3,4]] viewed from offset 1 of a 5-element storage}."""
    g = lambda module, name: pickle.GLOBAL + f"{module}\n{name}\n".encode()  # noqa: E731
    s = lambda text: pickle.BINUNICODE + struct.pack("<I", len(text)) + text.encode()  # noqa: E731
    i = lambda n: pickle.BININT1 + bytes([n])  # noqa: E731
    tensor = (
        g("torch._utils", "_rebuild_tensor_v2") + pickle.MARK
        + pickle.MARK + s("storage") + g("torch", "FloatStorage") + s("0") + s("cpu") + i(5)
        + pickle.TUPLE + pickle.BINPERSID
        + i(1) + i(2) + i(2) + pickle.TUPLE2 + i(2) + i(1) + pickle.TUPLE2 + pickle.NEWFALSE
        + g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        + pickle.TUPLE + pickle.REDUCE
    )
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + s("w") + tensor + pickle.SETITEM + pickle.STOP


def test_hand_built_zip_file(tmp_path):
    path = tmp_path / "hand.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("hand/data.pkl", _hand_built_pickle())
        zf.writestr("hand/data/0", np.arange(5, dtype="<f4").tobytes())
    sd = torch_pickle.load_state_dict(path)
    np.testing.assert_array_equal(sd["w"], [[1, 2], [3, 4]])
    assert sd["w"].dtype == np.float32


def test_hand_built_legacy_file(tmp_path):
    path = tmp_path / "hand.pth"
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        # Legacy persistent ids carry a sixth item, the view metadata; patch it in.
        body = _hand_built_pickle().replace(pickle.TUPLE + pickle.BINPERSID, pickle.NONE + pickle.TUPLE + pickle.BINPERSID)
        f.write(body)
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", 5) + np.arange(5, dtype="<f4").tobytes())
    np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["w"], [[1, 2], [3, 4]])


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    """Harmless, but not something a state dict holds."""


def _write_zip(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)


def _write_legacy(path, payload: bytes) -> None:
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(payload)
        pickle.dump([], f, protocol=2)


@pytest.mark.parametrize("write", [_write_zip, _write_legacy, lambda path, payload: path.write_bytes(payload)])
def test_code_execution_is_refused(tmp_path, write):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write(path, pickle.dumps({"w": _Evil(str(marker))}, protocol=2))
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"(posix|os|nt)\.system") as info:
        torch_pickle.load_state_dict(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize("write", [_write_zip, _write_legacy])
def test_custom_class_is_refused(tmp_path, write):
    path = tmp_path / "custom.pth"
    write(path, pickle.dumps(collections.OrderedDict(w=Custom()), protocol=2))
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="Custom"):
        torch_pickle.load_state_dict(path)


def test_loader_objects_cannot_be_modified(tmp_path):
    """BUILD on an allow-listed global must not change how later files load."""
    g = lambda module, name: pickle.GLOBAL + f"{module}\n{name}\n".encode()  # noqa: E731
    attack = (pickle.PROTO + b"\x02" + g("torch", "FloatStorage") + pickle.NONE
              + pickle.MARK + pickle.SHORT_BINUNICODE + b"\x05dtype" + pickle.SHORT_BINUNICODE + b"\x02f8"
              + pickle.DICT + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)
    path = tmp_path / "attack.pth"
    _write_zip(path, attack)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="set the state"):
        torch_pickle.load(path)
    test_round_trip(tmp_path, legacy=False)  # float32 storages still read as float32


def test_malformed_pickle_is_a_value_error(tmp_path):
    path = tmp_path / "bad.pth"
    _write_zip(path, pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.NONE + pickle.MARK
               + pickle.SHORT_BINUNICODE + b"\x01x" + pickle.NONE + pickle.DICT
               + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)  # setattr on a dict: AttributeError
    with pytest.raises(ValueError, match="not a valid PyTorch checkpoint"):
        torch_pickle.load(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    _write_zip(path, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(ValueError, match="state dict"):
        torch_pickle.load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        torch_pickle.load_state_dict(tmp_path / "absent.pth")


@pytest.mark.reference
@pytest.mark.parametrize("zip_format", [True, False])
def test_against_torch(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = collections.OrderedDict(
        w=torch.randn(3, 2, 5, 5),
        view=base[1:3, ::2],  # shares its storage with "base", at an offset and with strides
        base=base,
        count=torch.tensor(5),
        half=torch.randn(4).half(),
        bf16=torch.randn(4).bfloat16(),
        param=torch.nn.Parameter(torch.ones(3)),
    )
    path = tmp_path / "torch.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    got = torch_pickle.load_state_dict(path)
    for k, v in sd.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        np.testing.assert_array_equal(np.asarray(got[k], want.dtype), want, err_msg=k)
        assert got[k].shape == tuple(v.shape)

    # And torch reads what we write, in the same format.
    ours = tmp_path / "ours.pth"
    save_state_dict(_sample(), ours, legacy=not zip_format)
    back = torch.load(ours)
    for k, v in _sample().items():
        t = back[k].float() if back[k].dtype == torch.bfloat16 else back[k]
        np.testing.assert_array_equal(t.numpy(), np.asarray(v, t.numpy().dtype), err_msg=k)


def test_hostile_file_leaves_no_state_for_the_next_load(tmp_path):
    """A crafted `_rebuild_tensor_v3(torch.FloatStorage, ..., dtype=torch.int8)` is refused, and a genuine
    float32 file loaded next in the same process comes back intact (the reader keeps no shared state)."""
    g = lambda module, name: pickle.GLOBAL + f"{module}\n{name}\n".encode()  # noqa: E731
    attack = (pickle.PROTO + b"\x02" + g("torch._utils", "_rebuild_tensor_v3") + pickle.MARK
              + g("torch", "FloatStorage") + pickle.BININT1 + b"\x00"
              + pickle.BININT1 + b"\x01" + pickle.TUPLE1 + pickle.BININT1 + b"\x01" + pickle.TUPLE1
              + pickle.NEWFALSE + g("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
              + g("torch", "int8") + pickle.TUPLE + pickle.REDUCE + pickle.STOP)
    hostile = tmp_path / "hostile.pth"
    _write_zip(hostile, attack)
    with pytest.raises(torch_pickle.UnsafeCheckpointError):
        torch_pickle.load(hostile)
    genuine = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    for legacy in (False, True):
        path = tmp_path / f"genuine{legacy}.pth"
        save_state_dict(genuine, path, legacy=legacy)
        out = torch_pickle.load_state_dict(path)
        assert out["w"].dtype == np.float32
        np.testing.assert_array_equal(out["w"], genuine["w"])
