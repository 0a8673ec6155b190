"""Lazy `.npz` reading: arrays are read (sliced, cast) only where they are used.

`open_npz(path)` parses the zip and `.npy` headers of every member and returns {key: LazyArray}
without reading any array data. A member stored uncompressed (`numpy.savez`, what Google's vit_jax
and big_vision write) is read through a read-only `np.memmap` of its bytes inside the zip, mapped
for the duration of one read only (so the pages it touched leave the process with it); a compressed
member (`numpy.savez_compressed`) or an unusual one (an encrypted member, `.npy` format 3.0) is
decompressed whole when first read, one array at a time (the last one is kept for the next slice).

    arrays = open_npz("ViT-G_14.npz")             # headers only
    k = arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]   # LazyArray (1664, 8192)
    k.astype(np.float32)[:, :1024]                 # reads 1664 x 1024 values, cast on the fly
    to_device(k, sharding)                         # each addressable device reads only its slice

A LazyArray has `shape`, `dtype`, `ndim`, `size`, `nbytes`; indexing it with ints and slices reads
those values into a numpy array; `np.asarray(x)` reads it all. `astype`, `take` (an index of the
leading axis) and `stack` return new LazyArrays; nothing is read until a slice is asked for.
"""

from __future__ import annotations

import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

Index = tuple  # of ints and slices, one per axis

_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_CHUNK = 1 << 24  # 16 MiB: the verification pass reads members in chunks of this size


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, or its contents are not a ViT parameter tree."""


class LazyArray:
    """An array whose values are read by `reader(index)` (a numpy array for a full index of ints and
    slices), cast to `dtype` as they are read."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, reader: Callable[[Index], np.ndarray],
                 source: str = ""):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._reader = reader
        self.source = source  # for messages: "<file>:<member>"

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d LazyArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype}, source={self.source!r})"

    def read(self, index: Any = ()) -> np.ndarray:
        """The values at `index` (ints, slices, Ellipsis) as a numpy array of `self.dtype`."""
        full = _full_index(index, self.shape)
        if full is None:  # fancy indexing: read everything, then index
            return self.read()[index]
        out = np.asarray(self._reader(full))
        return out if out.dtype == self.dtype else out.astype(self.dtype)

    __getitem__ = read

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any, copy: bool = False) -> LazyArray:
        """A LazyArray of the same values cast to `dtype` when read (self when the dtype is the same)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return LazyArray(self.shape, dtype, self._reader, self.source)

    def take(self, i: int) -> LazyArray:
        """`self[i]` as a LazyArray (an index of the leading axis, e.g. one block of a scanned file)."""
        if not self.shape or not -self.shape[0] <= i < self.shape[0]:
            raise IndexError(f"index {i} out of range for the leading axis of {self!r}")
        i = i % self.shape[0]
        return LazyArray(self.shape[1:], self.dtype, lambda idx: self._reader((i, *idx)), f"{self.source}[{i}]")


def stack(xs: Sequence[Any]) -> LazyArray:
    """LazyArrays (or arrays) of one shape stacked along a new leading axis, read lazily."""
    xs = list(xs)
    shape, dtype = tuple(np.shape(xs[0])), np.result_type(*[x.dtype for x in xs])
    if any(tuple(np.shape(x)) != shape for x in xs):
        raise ValueError(f"cannot stack arrays of shapes {sorted({tuple(np.shape(x)) for x in xs})}")

    def reader(idx: Index) -> np.ndarray:
        first, rest = idx[0], idx[1:]
        if isinstance(first, int):
            return _read(xs[first], rest)
        return np.stack([_read(xs[j], rest) for j in range(len(xs))[first]]) if len(range(len(xs))[first]) \
            else np.empty((0,) + _sliced_shape(shape, rest), dtype)

    return LazyArray((len(xs),) + shape, dtype, reader, f"stack of {len(xs)}")


def _read(x: Any, idx: Any) -> np.ndarray:
    return x.read(idx) if isinstance(x, LazyArray) else np.asarray(x)[idx]


def _sliced_shape(shape: tuple[int, ...], idx: Index) -> tuple[int, ...]:
    return tuple(len(range(n)[s]) for n, s in zip(shape, idx) if isinstance(s, slice))


def _full_index(index: Any, shape: tuple[int, ...]) -> Index | None:
    """`index` as one int or slice per axis (Ellipsis expanded), or None for anything else."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    if len(index) > len(shape) or not all(isinstance(i, (slice, int, np.integer)) for i in index):
        return None
    out = []
    for n, i in zip(shape, index + (slice(None),) * (len(shape) - len(index))):
        if isinstance(i, slice):
            out.append(i)
        elif -n <= int(i) < n:
            out.append(int(i) % n)
        else:
            raise IndexError(f"index {int(i)} is out of bounds for an axis of size {n}")
    return tuple(out)


# ------------------------------------------------------------------------------------- npz members


class _Member:
    """Where one `.npy` member lives in the zip and how to read it."""

    def __init__(self, npz: LazyNpz, info: zipfile.ZipInfo):
        self.npz, self.info, self.key = npz, info, info.filename[:-4] if info.filename.endswith(".npy") \
            else info.filename
        self.offset: int | None = None  # of the array data in the file (stored members)
        self.shape, self.dtype, self.fortran = self._parse()

    def _parse(self) -> tuple[tuple[int, ...], np.dtype, bool]:
        info, f = self.info, self.npz.file
        stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1
        if stored:
            f.seek(info.header_offset)
            local = f.read(_LOCAL_HEADER)
            if len(local) < _LOCAL_HEADER or local[:4] != b"PK\x03\x04":
                raise self.npz.error(f"member {info.filename!r} has no valid zip local header")
            start = info.header_offset + _LOCAL_HEADER + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            f.seek(start)
            header = _read_header(f)
            if header is not None:
                shape, fortran, dtype = header
                decoded = self._decoded(dtype)  # refuses pickles first
                self.offset = f.tell()
                if self.offset - start + _nbytes(shape, dtype) != info.compress_size:
                    raise self.npz.error(
                        f"member {info.filename!r} holds {info.compress_size - self.offset + start} array bytes, "
                        f"its header says {_nbytes(shape, dtype)} ({tuple(shape)} {dtype})")
                if self.offset + _nbytes(shape, dtype) > self.npz.file_size:
                    raise self.npz.error(f"member {info.filename!r} ends after the end of the file")
                return tuple(shape), decoded, bool(fortran)
        # compressed (or an unusual stored member): the header is read through zipfile
        with zipfile.ZipFile(self.npz.path) as z, z.open(info) as g:
            header = _read_header(g)
        if header is None:  # a .npy format this reader does not parse (3.0): read it whole now
            arr = self.npz.whole(self)
            header = (arr.shape, False, arr.dtype)
        shape, fortran, dtype = header
        return tuple(shape), self._decoded(dtype), bool(fortran)

    def _decoded(self, dtype: np.dtype) -> np.dtype:
        if dtype.hasobject:
            raise self.npz.error(
                f"array {self.key!r} holds pickled Python objects, which are refused for safety (loading them "
                "can run arbitrary code). Save plain numeric arrays (numpy.savez of float arrays, or "
                "jax_peft.save_checkpoint)", fix=False)
        if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None:  # bfloat16 as raw bytes
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return dtype

    def read(self, idx: Index) -> np.ndarray:
        if self.offset is None:
            return np.array(self.npz.whole(self)[idx])  # a copy: the cached array stays intact
        if 0 in self.shape:
            return np.empty(self.shape, self.dtype)[idx]
        order = "F" if self.fortran else "C"
        with self.npz.lock:  # np.memmap seeks the shared file object
            try:
                mm = np.memmap(self.npz.file, self.dtype, "r", self.offset, self.shape, order)
            except (OSError, ValueError):  # a file system without mmap: read the member's bytes
                self.npz.file.seek(self.offset)
                data = self.npz.file.read(_nbytes(self.shape, self.dtype))
                return np.frombuffer(data, self.dtype).reshape(self.shape, order=order)[idx].copy()
        try:
            return np.array(mm[idx])  # a copy: the mapping is closed with `mm`
        finally:
            del mm

    def verify(self) -> bool:
        """Checks the member's CRC-32 (reading it in chunks); True when its float values are all finite."""
        if self.offset is None:
            return _finite(self.npz.whole(self))
        finite, f, info = True, self.npz.file, self.info
        data_start = self.offset - (info.compress_size - _nbytes(self.shape, self.dtype))
        with self.npz.lock:
            f.seek(data_start)
            crc = zlib.crc32(f.read(self.offset - data_start))
            left = _nbytes(self.shape, self.dtype)
            step = _CHUNK - _CHUNK % max(self.dtype.itemsize, 1)
            while left > 0:
                buf = f.read(min(step, left))
                if not buf:
                    raise self.npz.error(f"member {info.filename!r} ends after the end of the file")
                crc, left = zlib.crc32(buf, crc), left - len(buf)
                if finite:
                    finite = _finite(np.frombuffer(buf, self.dtype))
        if crc != info.CRC:
            raise self.npz.error(f"member {info.filename!r} fails its CRC-32 check (corrupted bytes)")
        return finite


def _read_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the `.npy` header at `f`'s position (format 1.0 or 2.0), or None."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def _nbytes(shape: Sequence[int], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _finite(a: np.ndarray) -> bool:
    if a.dtype.kind not in "fc" and "float" not in a.dtype.name:
        return True
    return bool(np.all(np.isfinite(a.astype(np.float32) if a.dtype.kind == "f" and a.dtype.itemsize > 4 else a)))


class LazyNpz(dict):
    """{key: LazyArray} of one `.npz` file (see the module docstring); the file stays open while any
    of its arrays is alive."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        self.lock = threading.RLock()
        self._whole: tuple[str, np.ndarray] | None = None
        try:
            self.file = open(self.path, "rb")  # closed when the last of its arrays is garbage-collected
            self.file_size = os.fstat(self.file.fileno()).st_size
            with zipfile.ZipFile(self.file) as z:
                infos = z.infolist()
            self.members = [_Member(self, i) for i in infos]
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise self.error(str(e)) from None
        for m in self.members:
            self[m.key] = LazyArray(m.shape, m.dtype, m.read, f"{self.path}:{m.key}")

    def error(self, what: str, fix: bool = True) -> CheckpointError:
        return CheckpointError(f"cannot read checkpoint {self.path}: {what}."
                        + (" The file is probably truncated or corrupted; delete it and download it again "
                           "(or re-save it with numpy.savez)." if fix else ""))

    def whole(self, member: _Member) -> np.ndarray:
        """A member read whole through zipfile (compressed members), cached until the next one."""
        with self.lock:
            if self._whole is None or self._whole[0] != member.key:
                self._whole = None
                try:
                    with zipfile.ZipFile(self.path) as z, z.open(member.info) as g:
                        arr = np.lib.format.read_array(g, allow_pickle=False)
                except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
                    raise self.error(f"member {member.info.filename!r}: {e}") from None
                arr = arr.view(member._decoded(arr.dtype))
                self._whole = (member.key, arr)
            return self._whole[1]

    def verify(self) -> list[str]:
        """Reads every member once in chunks, checking its CRC-32 (CheckpointError on a mismatch); returns the
        keys of float arrays holding NaN or Inf."""
        try:
            return [m.key for m in self.members if not m.verify()]
        finally:
            self._whole = None

    def __del__(self) -> None:
        f = getattr(self, "file", None)
        if f is not None:
            f.close()


def open_npz(path: str | os.PathLike) -> LazyNpz:
    """{key: LazyArray} of every member of the `.npz` at `path`; no array data is read.

    Raises CheckpointError (a ValueError) naming the file when it is truncated, corrupted or holds pickles."""
    return LazyNpz(path)


def iter_lazy(tree: Any) -> Iterator[LazyArray]:
    """The LazyArray leaves of a nested dict."""
    if isinstance(tree, LazyArray):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from iter_lazy(v)


# ---------------------------------------------------------------------------------------- devices


def to_device(x: Any, sharding: Any) -> Any:
    """`x` (a LazyArray, numpy array or jax.Array) as a jax.Array with `sharding`, built with
    `jax.make_array_from_callback`: each addressable device receives only its own slice, read from
    the file for a LazyArray (a slice that several devices share is read once)."""
    import jax

    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:
            raise ValueError(f"cannot reshard a global array with sharding {x.sharding}")
    src = x if isinstance(x, LazyArray) else np.asarray(x)
    read = src.read if isinstance(src, LazyArray) else src.__getitem__
    done: dict[tuple, np.ndarray] = {}

    def callback(index: Index) -> np.ndarray:
        key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
        if key not in done:
            done[key] = read(index)
        return done[key]

    return jax.make_array_from_callback(tuple(src.shape), sharding, callback)


def place(tree: Any, sharding: Any) -> dict:
    """Every leaf of a nested dict on devices with `to_device`, one leaf at a time.

    `sharding`: one `jax.sharding.Sharding` for every leaf, a function `(path, leaf) -> Sharding`
    ('/'-joined paths), or a nested dict of shardings with the tree's structure."""
    import jax

    from jax_peft import paths

    flat = paths.flatten(tree)
    if isinstance(sharding, jax.sharding.Sharding):
        return paths.unflatten({p: to_device(x, sharding) for p, x in flat.items()})
    if callable(sharding):
        return paths.unflatten({p: to_device(x, sharding(p, x)) for p, x in flat.items()})
    given = paths.flatten(sharding)
    missing = [p for p in flat if p not in given]
    if missing:
        raise ValueError(f"the sharding tree has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "give one Sharding per leaf, one Sharding for all, or a function (path, leaf) -> Sharding")
    return paths.unflatten({p: to_device(x, given[p]) for p, x in flat.items()})
