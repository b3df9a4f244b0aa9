"""The site's cache of decoded images, in their sparse form (catalog/sparse.py).

An entry is keyed by the file's identity: resolved path, size, mtime_ns, inode and
ctime_ns. Any write to the file changes its ctime (and rename-over changes its inode), so a
changed file misses and is decoded again; its stale entry is never served. Memory is
bounded by `max_bytes` (least recently used first out). With a directory, entries are also
kept on disk (bounded by `disk_max_bytes`, oldest first out), so a restarted daemon does
not decode its catalogs again; an entry read back is checked whole (magic, SHA-256 of the
content, the key it was written for, dtypes, sizes, index order and range) and any
mismatch deletes it: a cache file is never trusted over the image.

The disk entries hold the images' non-zero voxels: the same data as the catalog, under the
state directory (mode 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stimnetd.catalog.sparse import SparseImage, index_dtype

_MAGIC = b"STIMNET-IMG1\n"
_DIGEST = 32
# dtypes an image's values may have on disk: plain numbers only (never objects).
_VALUE_DTYPES = frozenset({"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4",
                           "<f8"})


@dataclass(frozen=True)
class FileKey:
    path: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        """The identity of the file at `path` now (OSError if it cannot be stat'ed)."""
        real = path.resolve()
        st = real.stat()
        return cls(str(real), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def name(self) -> str:
        text = json.dumps([self.path, self.size, self.mtime_ns, self.inode, self.ctime_ns])
        return hashlib.sha256(text.encode()).hexdigest()[:40]


@dataclass
class CacheCounters:
    hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    discarded: int = 0  # disk entries that failed their checks


class ImageCache:
    """Thread-safe: the engine runs on worker threads."""

    def __init__(self, max_bytes: int, directory: Path | None = None,
                 disk_max_bytes: int = 0) -> None:
        self.max_bytes = max(0, max_bytes)
        self.counters = CacheCounters()
        self._lock = threading.Lock()
        self._entries: OrderedDict[FileKey, SparseImage] = OrderedDict()
        self._bytes = 0
        self._dir = directory if directory is not None and disk_max_bytes > 0 else None
        self._disk_max = disk_max_bytes
        self._disk_bytes = 0
        self._disk_open = False

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: FileKey) -> SparseImage | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.counters.hits += 1
                return hit
        found = self._read_disk(key)
        with self._lock:
            if found is None:
                self.counters.misses += 1
                return None
            self.counters.disk_hits += 1
            self._remember(key, found)
        return found

    def put(self, key: FileKey, image: SparseImage) -> None:
        with self._lock:
            self._remember(key, image)
        self._write_disk(key, image)

    def _remember(self, key: FileKey, image: SparseImage) -> None:
        if image.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = image
        self._bytes += image.nbytes
        while self._bytes > self.max_bytes:
            _, out = self._entries.popitem(last=False)
            self._bytes -= out.nbytes

    # --- disk ---

    def _path(self, key: FileKey) -> Path:
        """Where `key`'s entry lives; the directory is made (and measured) at first use,
        so a daemon that never maps (or check-config) leaves nothing behind."""
        assert self._dir is not None
        with self._lock:
            if not self._disk_open:
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                for stale in self._dir.glob("*.tmp"):
                    stale.unlink(missing_ok=True)
                self._disk_bytes = sum(_size(p) for p in self._dir.glob("*.img"))
                self._disk_open = True
        return self._dir / f"{key.name()}.img"

    def _read_disk(self, key: FileKey) -> SparseImage | None:
        if self._dir is None:
            return None
        try:
            path = self._path(key)
            data = path.read_bytes()
        except OSError:
            return None
        image = _decode(data, key)
        if image is None:
            with self._lock:
                self.counters.discarded += 1
                self._disk_bytes -= len(data)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        _touch(path)
        return image

    def _write_disk(self, key: FileKey, image: SparseImage) -> None:
        if self._dir is None:
            return
        data = _encode(key, image)
        if len(data) > self._disk_max:
            return
        try:
            path = self._path(key)
        except OSError:
            return
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            _touch(path)
        except OSError:
            # A full or read-only disk costs the next start a decode, never a query.
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self._disk_bytes += len(data)
            over = self._disk_bytes > self._disk_max
        if over:
            self._evict_disk()

    def _evict_disk(self) -> None:
        assert self._dir is not None
        files = []
        for p in self._dir.glob("*.img"):
            with contextlib.suppress(OSError):
                st = p.stat()
                files.append((st.st_mtime_ns, st.st_size, p))
        files.sort()
        total = sum(size for _, size, _ in files)
        # Down to 90 % of the cap, so that one write does not rescan the directory.
        target = self._disk_max * 9 // 10
        for _, size, p in files:
            if total <= target:
                break
            p.unlink(missing_ok=True)
            total -= size
        with self._lock:
            self._disk_bytes = total


def _touch(path: Path) -> None:
    """Oldest-first eviction reads mtime as the last use; set from the fine clock (the
    kernel stamps files from a coarse one, a few ms apart, which would tie)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(path, ns=(now, now))


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _encode(key: FileKey, image: SparseImage) -> bytes:
    index = np.ascontiguousarray(image.index, dtype=index_dtype(image.shape))
    values = np.ascontiguousarray(image.values)
    values = values.astype(values.dtype.newbyteorder("<"))
    header = json.dumps({"key": [key.path, key.size, key.mtime_ns, key.inode, key.ctime_ns],
                         "shape": list(image.shape), "index": index.dtype.str,
                         "values": values.dtype.str, "n": int(index.size)}).encode()
    body = _MAGIC + len(header).to_bytes(4, "little") + header + index.tobytes() + \
        values.tobytes()
    return body + hashlib.sha256(body).digest()


def _decode(data: bytes, key: FileKey) -> SparseImage | None:
    """The entry in `data` if it passes every check for `key`, else None."""
    if len(data) < len(_MAGIC) + 4 + _DIGEST or not data.startswith(_MAGIC):
        return None
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        at = len(_MAGIC)
        hlen = int.from_bytes(body[at:at + 4], "little")
        head = json.loads(body[at + 4:at + 4 + hlen])
        shape = tuple(int(s) for s in head["shape"])
        n = int(head["n"])
        if head["key"] != [key.path, key.size, key.mtime_ns, key.inode, key.ctime_ns] \
                or not shape or min(shape) <= 0 \
                or head["index"] != np.dtype(index_dtype(shape)).str \
                or head["values"] not in _VALUE_DTYPES or n < 0:
            return None
        idt, vdt = np.dtype(head["index"]), np.dtype(head["values"])
        start = at + 4 + hlen
        if len(body) != start + n * (idt.itemsize + vdt.itemsize):
            return None
        index = np.frombuffer(body, idt, n, start)
        values = np.frombuffer(body, vdt, n, start + n * idt.itemsize)
        grid = int(np.prod(shape))
        if n and (index[0] < 0 or index[-1] >= grid or not np.all(index[1:] > index[:-1])):
            return None
        if n and np.any(values == 0):
            return None
    except (ValueError, KeyError, TypeError, OverflowError):
        return None
    return SparseImage(shape, index.copy(), values.astype(vdt.newbyteorder("=")))
