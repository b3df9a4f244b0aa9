"""Catalog images in their sparse form, from the cache or decoded on every core.

`SparseReader.read` looks each file up in the `ImageCache` by its identity, and decodes
the misses in a pool of worker processes (`[compute] workers`; gunzip and the NIfTI parse
hold the GIL, so threads would use one core). It blocks: the engine calls it off the event
loop. The pool uses `spawn`: a forked copy of a daemon running gRPC's threads is unsafe.
A decoded image is cached only if its file still has the identity it had before it was
read, so a file changed during a query is decoded again next time.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import structlog

from stimnetd.catalog.imagecache import FileKey, ImageCache
from stimnetd.catalog.loader import _inside
from stimnetd.catalog.sparse import SparseImage, decode_sparse

log = structlog.get_logger(__name__)

# Fewer misses than this are decoded on the caller's thread: a round trip to the pool
# costs more than decoding a few images.
POOL_MIN_MISSES = 4
# Chunks per worker: enough to balance uneven files, few enough to keep the pickling small.
CHUNKS_PER_WORKER = 4


def decode_chunk(root: str, catalog: str, relpaths: Sequence[str]) -> list[SparseImage]:
    """A worker's task (top level: the pool pickles it by name)."""
    return [decode_sparse(Path(root), catalog, rel) for rel in relpaths]


def _warm() -> None:
    """Imports done, so the first query does not pay for them in every worker."""


class SparseReader:
    def __init__(self, cache: ImageCache, workers: int) -> None:
        self.cache = cache
        self.workers = workers
        self._pool: Executor | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self.decoded_in_pool = 0

    def _executor(self) -> Executor:
        """The pool, started on first use. It counts as ready once every worker has
        imported the decoding code (seconds on a loaded machine); until then misses are
        decoded on the caller's thread, so starting the pool never delays a query."""
        with self._lock:
            if self._pool is None:
                self._ready.clear()
                self._pool = pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
                pending = [pool.submit(_warm) for _ in range(self.workers)]
                left = [len(pending)]

                def one_done(_: object) -> None:
                    with self._lock:
                        left[0] -= 1
                        if left[0] == 0 and self._pool is pool:
                            self._ready.set()

                for f in pending:
                    f.add_done_callback(one_done)
            return self._pool

    def start(self) -> None:
        """Start the workers now rather than at the first image query."""
        if self.workers > 0:
            self._executor()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def read(self, root: Path, catalog: str, relpaths: Sequence[str]) -> list[SparseImage]:
        """The images at `relpaths` (relative to `root`), in that order."""
        keys: dict[str, FileKey | None] = {}
        found: dict[str, SparseImage] = {}
        for rel in dict.fromkeys(relpaths):
            try:
                keys[rel] = key = FileKey.of(_inside(root, rel, catalog))
            except OSError:
                keys[rel] = None  # decode_sparse says what is wrong with the file
                continue
            hit = self.cache.get(key)
            if hit is not None:
                found[rel] = hit
        missing = [rel for rel in keys if rel not in found]
        for rel, image in zip(missing, self._decode(root, catalog, missing), strict=True):
            found[rel] = image
            before = keys[rel]
            try:
                same = before is not None and FileKey.of(_inside(root, rel, catalog)) == before
            except OSError:
                same = False
            if same and before is not None:
                self.cache.put(before, image)
        return [found[rel] for rel in relpaths]

    def _decode(self, root: Path, catalog: str, relpaths: list[str]) -> list[SparseImage]:
        if self.workers == 0 or len(relpaths) < POOL_MIN_MISSES:
            return decode_chunk(str(root), catalog, relpaths)
        try:
            pool = self._executor()
        except OSError as exc:
            # No semaphores or processes here (a sandboxed service): decode on the
            # query's thread from now on, rather than fail every map query.
            log.warning("image_pool_unavailable", error=str(exc), workers=self.workers)
            self.workers = 0
            return decode_chunk(str(root), catalog, relpaths)
        if not self.ready:
            return decode_chunk(str(root), catalog, relpaths)
        size = max(1, math.ceil(len(relpaths) / (self.workers * CHUNKS_PER_WORKER)))
        chunks = [relpaths[i:i + size] for i in range(0, len(relpaths), size)]
        try:
            futures = [pool.submit(decode_chunk, str(root), catalog, c) for c in chunks]
            images = [image for f in futures for image in f.result()]
            self.decoded_in_pool += len(images)
            return images
        except BrokenProcessPool:
            # A worker died (the OOM killer, a signal): this query decodes here, the next
            # one starts a new pool.
            log.warning("image_pool_broken", workers=self.workers)
            with self._lock:
                if self._pool is pool:
                    self._pool = None
                    self._ready.clear()
            pool.shutdown(wait=False, cancel_futures=True)
            return decode_chunk(str(root), catalog, relpaths)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
