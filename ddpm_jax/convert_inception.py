"""Convert pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` to a .npz, without torch.

    python -m ddpm_jax.convert_inception pt_inception-2015-12-05-6726825d.pth OUT.npz

A `torch.save`d state_dict is a pickle whose tensors point at raw storages held elsewhere. Two
container formats exist and both are read here:

* zip (torch >= 1.6): `<archive>/data.pkl` plus one little-endian blob per storage at
  `<archive>/data/<key>` (and an optional `<archive>/byteorder` record);
* legacy (torch < 1.6, e.g. files made in 2019): four pickles back to back (magic number,
  protocol version, sys info, the object) followed by the pickled list of storage keys, then for
  each key an int64 element count and the raw bytes.

The object pickle is parsed by `_RestrictedUnpickler`, whose `find_class` resolves only
`collections.OrderedDict`, `torch._utils._rebuild_tensor(_v2)`/`_rebuild_parameter` and the
`torch.*Storage` type names, each to an inert stand-in defined here, so no code from the file can
run. Tensors are rebuilt with NumPy from (storage, offset, size, stride) after bounds checks.

Output: one array per state_dict key, under the same name, with conv weights transposed
OIHW -> HWIO and Linear weights [out, in] -> [in, out]; BatchNorm parameters and running stats
are kept as they are (nothing is folded) and `*.num_batches_tracked` counters are dropped. See
`ddpm_jax.inception` for how the names map onto Flax variables.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

import numpy as np

from ddpm_jax.inception import FORMAT_KEY, FORMAT_VALUE

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> little-endian NumPy dtype of its elements.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage named by the pickle; `offset`/`numel` describe a legacy storage view."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    # Stand-in for torch._utils._rebuild_tensor_v2; requires_grad / hooks / metadata ignored.
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor without a storage reference")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, *_unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts, tensor references and storage references."""

    _allowed: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,  # torch 0.3: same leading args
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip: ('storage', type, key, location, numel)
        # legacy: ('storage', type, root_key, location, numel, view_metadata)
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or _ascii(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, numel = pid[1], _ascii(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(key, storage_type.dtype, numel)
        _view_key, view_offset, view_numel = view
        return _StorageRef(key, storage_type.dtype, int(view_numel), int(view_offset))


def _ascii(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _unpickle(data: bytes | BinaryIO) -> Any:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return _RestrictedUnpickler(stream, encoding="latin1").load()


def _materialize(ref: _TensorRef, blobs: dict[str, np.ndarray]) -> np.ndarray:
    """Copy a strided view of a storage into a fresh C-contiguous array, bounds-checked."""
    flat = blobs[ref.storage.key]
    start = ref.storage.offset
    flat = flat[start : start + ref.storage.numel]
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in ref.size + ref.stride):
        raise ValueError(f"bad tensor geometry size={ref.size} stride={ref.stride}")
    if 0 in ref.size:
        return np.zeros(ref.size, flat.dtype)
    last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or last >= flat.size:
        raise ValueError(f"tensor reads past its storage ({last} >= {flat.size})")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], ref.size, tuple(st * item for st in ref.stride), writeable=False
    )
    return np.array(view, copy=True)


def _storage_array(raw: bytes, dtype: np.dtype, numel: int, big_endian: bool = False) -> np.ndarray:
    dtype = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
    if len(raw) < numel * dtype.itemsize:
        raise ValueError(f"storage holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
    return np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("<"))


def _all_refs(obj: Any) -> list[_TensorRef]:
    if isinstance(obj, _TensorRef):
        return [obj]
    if isinstance(obj, dict):
        return [r for v in obj.values() for r in _all_refs(v)]
    return []


def _load_zip(path: str) -> dict[str, Any]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected exactly one data.pkl, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        big = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
        obj = _unpickle(zf.read(pkl[0]))
        blobs = {}
        for ref in _all_refs(obj):
            st = ref.storage
            if st.key not in blobs:
                raw = zf.read(f"{prefix}data/{st.key}")
                total = len(raw) // st.dtype.itemsize
                blobs[st.key] = _storage_array(raw, st.dtype, total, big)
    return _resolve(obj, blobs)


def _load_legacy(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        if _unpickle(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a torch checkpoint (bad magic number)")
        if _unpickle(f) != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch protocol version")
        sys_info = _unpickle(f)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian legacy checkpoints are not supported")
        obj = _unpickle(f)
        keys = [_ascii(k) for k in _unpickle(f)]
        roots: dict[str, np.dtype] = {}
        for ref in _all_refs(obj):
            roots.setdefault(ref.storage.key, ref.storage.dtype)
        blobs = {}
        # Storages follow in the order of `keys`, each as an int64 element count + raw bytes.
        for key in keys:
            if key not in roots:
                raise ValueError(f"{path}: storage {key} is not used by any tensor")
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = roots[key]
            blobs[key] = _storage_array(f.read(numel * dtype.itemsize), dtype, numel)
    return _resolve(obj, blobs)


def _resolve(obj: Any, blobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state_dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise TypeError(f"state_dict entry {key!r} is not a tensor")
        out[str(key)] = _materialize(value, blobs)
    return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a torch.save'd state_dict (zip or legacy format) as NumPy arrays, torch layouts."""
    return _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)


def to_flax_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OIHW conv weights -> HWIO, [out, in] Linear weights -> [in, out]; drop BN step counters."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith(".weight") and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif key.endswith(".weight") and value.ndim == 2:
            value = value.T
        out[key] = np.ascontiguousarray(value)
    return out


def convert(src: str, dst: str) -> dict[str, np.ndarray]:
    """Convert `src` (.pth) to `dst` (.npz), written atomically; returns the written arrays."""
    arrays = to_flax_layout(load_torch_state_dict(src))
    if FORMAT_KEY in arrays:
        raise ValueError(f"state_dict key collides with {FORMAT_KEY}")
    out_dir = os.path.dirname(os.path.abspath(dst))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{FORMAT_KEY: np.array(FORMAT_VALUE)})
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return arrays


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm_jax.convert_inception", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument(
        "dst", help="output .npz, e.g. ~/.cache/ddpm_jax/pt_inception-2015-12-05.npz"
    )
    args = parser.parse_args(argv)
    dst = os.path.expanduser(args.dst)
    try:
        arrays = convert(os.path.expanduser(args.src), dst)
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        parser.error(f"{type(e).__name__}: {e}")
    n = sum(a.size for a in arrays.values())
    print(f"wrote {len(arrays)} arrays ({n:,} values) to {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from ddpm_jax import quiet

    quiet.silence_tensorflow()  # TensorFlow is imported lazily, after this (see quiet.py)
    raise SystemExit(main())
