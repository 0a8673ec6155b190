"""PyTorch weight files without PyTorch: `.pth` (zip) and `.safetensors` as numpy arrays.

    sd = read_state_dict("swin_base_patch4_window7_224_22k.pth")   # {"layers.0.blocks.0...": ndarray}
    sd = read_state_dict("model.safetensors")
    save_safetensors("out.safetensors", sd)
    save_pth("out.pth", {"model": sd})                              # what torch.save writes

A `.pth` file is a zip archive holding one pickle (`<name>/data.pkl`) whose tensors point to raw
storages (`<name>/data/<key>`). Unpickling normally imports and calls whatever the file names, so a
malicious file runs code. This reader never does: its unpickler knows a closed set of names (the
tensor and parameter rebuild functions, the typed storage classes, `OrderedDict`) and refuses every
other global with a `TorchFileError` before anything is called. Nothing in this module imports torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np


class TorchFileError(ValueError):
    """A PyTorch weight file that cannot be read safely (or at all)."""


# torch storage class name -> numpy dtype (little-endian, as torch writes them)
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_DTYPE_STORAGES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}


class _StorageType:
    """Stands in for `torch.<X>Storage` inside the pickle: only its dtype is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    """`torch._utils._rebuild_tensor_v2`: a strided view of a flat storage, copied out."""
    size, stride = tuple(size), tuple(stride)
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if needed > storage.size:
        raise TorchFileError(
            f"a tensor of shape {size} (stride {stride}, offset {offset}) reads past its storage of "
            f"{storage.size} elements: the file is truncated or corrupted"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    """`torch._utils._rebuild_parameter`: an nn.Parameter is its data here."""
    return data


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensors, parameters, storages and OrderedDict; refuses everything else."""

    def __init__(self, file: io.BufferedIOBase, load_storage, source: str):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"{self._source} holds a pickled object of type {module}.{name}, which is not a tensor, "
            "a storage or a plain container; it was refused for safety and nothing in the file was "
            "run. Re-save the weights alone (e.g. torch.save(model.state_dict(), path) or "
            "safetensors) or convert them to .safetensors"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise TorchFileError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], pid[2], pid[3], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self._source}: unsupported storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def load_pth(path: str | os.PathLike) -> Any:
    """Unpickles a `torch.save` zip file into dicts/lists of numpy arrays, running no code.

    Raises:
      TorchFileError: a legacy (pre-zip) file, a missing `data.pkl`, or any pickled object that is
        not a tensor, storage or plain container.
    """
    source = os.fspath(path)
    if not zipfile.is_zipfile(source):
        raise TorchFileError(
            f"{source} is not a zip-format PyTorch file (torch >= 1.6 writes zip files; legacy files "
            "are not read because their format needs torch itself). Re-save it with a current torch "
            "or convert it to .safetensors"
        )
    with zipfile.ZipFile(source) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchFileError(f"{source}: expected one <name>/data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        cache: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            if key not in cache:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise TorchFileError(f"{source}: storage {entry} is missing (truncated file?)")
                raw = archive.read(entry)
                if len(raw) < numel * dtype.itemsize:
                    raise TorchFileError(
                        f"{source}: storage {entry} has {len(raw)} bytes, {numel} x {dtype} expected"
                    )
                cache[key] = np.frombuffer(raw, dtype=dtype, count=numel)
            return cache[key]

        with archive.open(pickles[0]) as f:
            return _RestrictedUnpickler(io.BufferedReader(f), load_storage, source).load()


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file as {name: ndarray} (bfloat16 as ml_dtypes.bfloat16)."""
    from safetensors.numpy import load_file

    try:
        return dict(load_file(os.fspath(path)))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise TorchFileError(f"{os.fspath(path)} is not a readable .safetensors file: {e}") from e


def flatten_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The weights of a loaded `.pth` object as a flat {name: ndarray}.

    Accepts a state dict, or a training checkpoint holding one under "model", "state_dict",
    "model_state" or "module" (Microsoft's Swin releases use "model"); a "module." prefix from
    DataParallel is removed.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise TorchFileError(f"{source} holds a {type(obj).__name__}, not a state dict of tensors")
    flat = {}
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise TorchFileError(
                f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor; pass the state "
                "dict itself"
            )
        flat[name[len("module."):] if name.startswith("module.") else name] = value
    return flat


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch weight file (`.pth`/`.pt`/`.bin` zip, or `.safetensors`) as a flat {name: ndarray}."""
    source = os.fspath(path)
    if source.endswith(".safetensors"):
        return load_safetensors(source)
    return flatten_state_dict(load_pth(source), source)


def _atomic_write(path: str | os.PathLike, write) -> None:
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(target)), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(
    path: str | os.PathLike, state_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes {name: array} as `.safetensors` (atomically; arrays made contiguous)."""
    from safetensors.numpy import save

    arrays = {k: np.require(np.asarray(v), requirements="C") for k, v in state_dict.items()}
    data = save(arrays, metadata=dict(metadata) if metadata else None)
    _atomic_write(path, lambda f: f.write(data))


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for the objects `torch.save` writes: dicts (as OrderedDict),
    lists, tuples, str, int, float, bool, None and tensors (numpy arrays as typed storages)."""

    def __init__(self):
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _str(self, s: str) -> None:
        data = s.encode("utf-8")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def _int(self, n: int) -> None:
        if -(2**31) <= n < 2**31:
            self.out.write(b"J" + struct.pack("<i", n))
        else:
            data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(data)]) + data)

    def _tuple(self, items) -> None:
        self.out.write(b"(")
        for item in items:
            self.save(item)
        self.out.write(b"t")

    def _tensor(self, array: np.ndarray) -> None:
        array = np.require(array, requirements="C")  # ascontiguousarray would make 0-d arrays 1-d
        if array.dtype not in _DTYPE_STORAGES:
            raise TorchFileError(f"no torch storage type for dtype {array.dtype}")
        key = str(len(self.storages))
        self.storages.append(array)
        strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"(")
        self.out.write(b"(")  # persistent id ('storage', type, key, location, numel)
        self._str("storage")
        self._global("torch", _DTYPE_STORAGES[array.dtype])
        self._str(key)
        self._str("cpu")
        self._int(array.size)
        self.out.write(b"tQ")
        self._int(0)
        self._tuple(array.shape)
        self._tuple(strides)
        self.out.write(b"\x89")  # requires_grad=False
        self._global("collections", "OrderedDict")
        self.out.write(b")R")
        self.out.write(b"tR")

    def save(self, obj: Any) -> None:
        if obj is None:
            self.out.write(b"N")
        elif isinstance(obj, bool):
            self.out.write(b"\x88" if obj else b"\x89")
        elif isinstance(obj, (int, np.integer)):
            self._int(int(obj))
        elif isinstance(obj, (float, np.floating)) and not isinstance(obj, np.ndarray):
            self.out.write(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
            self._tensor(np.asarray(obj))
        elif isinstance(obj, Mapping):
            self._global("collections", "OrderedDict")
            self.out.write(b")R(")
            for k, v in obj.items():
                self.save(k)
                self.save(v)
            self.out.write(b"u")
        elif isinstance(obj, list):
            self.out.write(b"](")
            for item in obj:
                self.save(item)
            self.out.write(b"e")
        elif isinstance(obj, tuple):
            self._tuple(obj)
        else:
            raise TorchFileError(f"cannot write a {type(obj).__name__} into a .pth file")


def save_pth(path: str | os.PathLike, obj: Any, archive_name: str = "archive") -> None:
    """Writes `obj` (nested dicts/lists of arrays and scalars) as `torch.save` would (zip format),
    atomically. `torch.load(path, weights_only=True)` reads the result."""
    writer = _PickleWriter()
    writer.out.write(b"\x80\x02")
    writer.save(obj)
    writer.out.write(b".")

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(f"{archive_name}/data.pkl", writer.out.getvalue())
            archive.writestr(f"{archive_name}/byteorder", "little")
            for key, array in enumerate(writer.storages):
                archive.writestr(f"{archive_name}/data/{key}", array.tobytes())
            archive.writestr(f"{archive_name}/version", "3\n")

    _atomic_write(path, write)

