"""Token shards and safe file reads: the bytes on disk under every corpus (data.py builds corpora on them).

    DataError(ValueError)                     every bad data input raises this, with a hint on what to do
    path_kind(path) / read_regular_file(path) regular files only (a FIFO, device or socket is refused,
                                              never opened), each read exactly to its size
    write_shard(path, tokens)                 a header of 256 int32 (magic 20251074, version 1, token
                                              count, dtype code 1=uint8 / 2=uint16), then the tokens;
                                              written atomically (files.atomic_write)
    read_shard(path) -> np.memmap             the tokens, memory-mapped, after checking the header and size
    ShardedArray(shards)                      several shards viewed as one 1-D array, without copying
"""

import operator
import os
from pathlib import Path
import stat

import numpy as np

from .files import atomic_write

# shard file = 256 little-endian int32 header words, then the tokens
SHARD_MAGIC = 20251074
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
DTYPE_CODES = {1: np.dtype("<u1"), 2: np.dtype("<u2")}


class DataError(ValueError):
    """Bad data input: the message says what was found, what is allowed and what to do."""


# -----------------------------------------------------------------------------
# reading files safely: regular files only, never more than their size

SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait for a writer forever"),
                 (stat.S_ISCHR, "a character device (like /dev/zero): it has no end to read to"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path):
    """None for a regular file or a folder (symlinks followed); otherwise what `path` is, in words."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as e:
        return f"not accessible ({e.strerror})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((what for test, what in SPECIAL_KINDS if test(mode)), "not a regular file")


def read_regular_file(path, what="data file"):
    """The bytes of a regular file, read up to its size. A FIFO/device/socket raises DataError
    without blocking (O_NONBLOCK, and fstat on the open descriptor closes the check-then-open race)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        kind = path_kind(path)
        raise DataError(f"cannot read {what} {path}: {kind if kind and kind != 'missing' else e.strerror}; "
                        f"check it exists and is readable") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{what} {path} is {path_kind(path) or 'not a regular file'}; only regular "
                            f"files are read")
        try:
            return f.read(st.st_size)       # never past the size it had when opened
        except OSError as e:
            raise DataError(f"cannot read {what} {path} ({e.strerror})") from None


# -----------------------------------------------------------------------------
# the shard format (shared with prepare.py)

def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    codes = {dt: code for code, dt in DTYPE_CODES.items()}
    if tokens.ndim != 1 or tokens.dtype not in codes:
        raise DataError(f"write_shard({path}): tokens must be a 1-D uint8 or uint16 array, got "
                        f"{tokens.ndim}-D {tokens.dtype}; convert with .astype(np.uint16) first")
    if len(tokens) >= 2**31:
        raise DataError(f"write_shard({path}): {len(tokens)} tokens do not fit the int32 header; "
                        f"use smaller shards")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:4] = [SHARD_MAGIC, SHARD_VERSION, len(tokens), codes[tokens.dtype]]
    atomic_write(path, [header.tobytes(), tokens.tobytes()])


def read_shard(path):
    path = Path(path)
    kind = "a folder" if path.is_dir() else path_kind(path)
    if kind == "missing":
        raise DataError(f"shard {path} does not exist; run `python -m minimoe.prepare` to create it")
    if kind:
        raise DataError(f"shard {path} is {kind}; a shard is a regular file written by minimoe.prepare")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"shard {path} is {size} bytes, smaller than the {HEADER_BYTES}-byte header; "
                        f"it is truncated: delete it and re-run prepare")
    magic, version, count, code = np.fromfile(path, dtype="<i4", count=4).tolist()
    if magic != SHARD_MAGIC:
        raise DataError(f"shard {path} has magic number {magic}, expected {SHARD_MAGIC}: "
                        f"not a minimoe shard file")
    if version != SHARD_VERSION:
        raise DataError(f"shard {path} has format version {version}, expected {SHARD_VERSION}; "
                        f"re-create it with this version of minimoe.prepare")
    if code not in DTYPE_CODES or count < 0:
        raise DataError(f"shard {path} has dtype code {code} / token count {count}; expected dtype "
                        f"code in {sorted(DTYPE_CODES)} and count >= 0: the header is corrupt")
    dtype = DTYPE_CODES[code]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        raise DataError(f"shard {path} is {size} bytes but its header says {count} tokens "
                        f"({expected} bytes expected); it is truncated or corrupt: delete it and re-run prepare")
    if count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class ShardedArray:
    """Several 1-D token arrays viewed as one, without copying (e.g. 100 memmapped FineWeb shards).
    Supports len(a), a[i], a[start:stop] (step 1) and np.asarray(a) (that one does copy)."""

    def __init__(self, shards):
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        self.ends = np.cumsum([len(s) for s in self.shards])  # ends[k] = one past shard k's last token

    def __len__(self):
        return int(self.ends[-1])

    @property
    def shape(self):
        return (len(self),)

    def _locate(self, i):  # global index -> (shard, index inside that shard)
        k = int(np.searchsorted(self.ends, i, side="right"))
        return k, i - int(self.ends[k] - len(self.shards[k]))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise DataError(f"ShardedArray only supports step-1 slices, got step {step}")
            parts = []
            while start < stop:
                k, j = self._locate(start)
                take = min(stop - start, len(self.shards[k]) - j)
                parts.append(self.shards[k][j:j + take])
                start += take
            return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        i = operator.index(idx)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for ShardedArray of length {len(self)}")
        k, j = self._locate(i % len(self))  # i % len maps negative indices into range
        return self.shards[k][j]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.shards)
        return out if dtype is None else out.astype(dtype)
