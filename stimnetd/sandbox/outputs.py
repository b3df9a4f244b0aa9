"""Reading what a job container wrote, trusting none of it.

Everything here was written by researcher code: the result file and its ``.npy`` side
files in the output directory, and the container's stdout/stderr. The result is read
only after the container has stopped (no process can race the checks), through
``O_NOFOLLOW`` opens relative to the output directory's fd, and only if it is a regular,
singly linked file within the size cap. What the result *says* is checked afterwards by
`stimnetd.sandbox.result.parse_result`.

A reason built here reaches the researcher, so it never quotes a name or value the
script chose; from the container's output only an exception type (one Python defines)
and a line number are taken.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

RESULT_NAME = "result.json"
# Decoding JSON holds the GIL throughout (about 25 ms a MiB here), so even in a worker
# thread a large result.json stalls the daemon's event loop; the bulk of a large result
# goes in .npy files, which load without parsing. The runtime puts every array of more
# than 4096 numbers there, so an honest result.json stays far below this.
RESULT_JSON_BYTES = 1024 * 1024
NPY_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\.npy\Z")
# The only line of container output the runner interprets; see sandbox/runtime/entrypoint.py.
MARKER_RE = re.compile(r"stimnet-runtime: ([A-Za-z_][A-Za-z0-9_]{0,63}) at line (\d{1,7})\Z")
MAX_LOG_LINES = 2000
MAX_LOG_LINE_CHARS = 2000
KNOWN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
) | {"gaierror", "herror", "JSONDecodeError", "ParserError", "EmptyDataError", "LinAlgError"}


class ResultRefused(Exception):
    """The output directory held something the runner will not read."""


def read_outputs(out: Path, cap: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The result document and the arrays it refers to (by file name), `cap` bytes in all.

    Blocking; raises ResultRefused naming the rule broken.
    """
    dir_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            raw = _read_capped(dir_fd, RESULT_NAME, "result file", min(cap, RESULT_JSON_BYTES),
                               over=None if cap <= RESULT_JSON_BYTES else (
                                   "result file is over its own limit of 1 MiB (arrays of "
                                   "more than 4096 numbers go in .npy files, as the runtime "
                                   "writes them): refused"))
        except FileNotFoundError:
            raise ResultRefused("script emitted no aggregates (no result file)") from None
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ResultRefused(f"result file is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(doc, dict):
            raise ResultRefused("result file is not a JSON object")
        budget = cap - len(raw)
        arrays: dict[str, np.ndarray] = {}
        for name in _npy_refs(doc):
            if name in arrays:
                continue
            if not NPY_NAME_RE.match(name):
                raise ResultRefused("an array file name is not a plain *.npy name: refused")
            try:
                # Never the file's name in a reason: the script chose it.
                data = _read_capped(dir_fd, name, "an array file", budget)
            except FileNotFoundError:
                raise ResultRefused("an array file the result refers to is missing") from None
            budget -= len(data)
            arrays[name] = load_npy(data)
        return doc, arrays
    finally:
        os.close(dir_fd)


def _read_capped(dir_fd: int, name: str, what: str, budget: int,
                 over: str | None = None) -> bytes:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise ResultRefused(f"{what} is a symlink: refused")
    if not stat.S_ISREG(st.st_mode):
        raise ResultRefused(f"{what} is not a regular file: refused")
    try:
        # O_NONBLOCK: a FIFO planted under the expected name must not hang the daemon.
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResultRefused(f"{what} is a symlink: refused") from None
        code = errno.errorcode.get(exc.errno or -1, exc.strerror or type(exc).__name__)
        raise ResultRefused(f"{what} cannot be opened ({code})") from None
    try:
        # The checks that count are on the opened file, not on the name looked up above.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ResultRefused(f"{what} is not a regular file: refused")
        if st.st_nlink != 1:
            raise ResultRefused(f"{what} has more than one hard link: refused")
        if st.st_size > budget:
            raise ResultRefused(over or f"{what} is over the result limit: refused")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(budget + 1)
    finally:
        os.close(fd)
    if len(data) > budget:
        raise ResultRefused(over or f"{what} is over the result limit")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _npy_refs(doc: dict[str, Any]) -> list[str]:
    refs: list[str] = []
    aggregates = doc.get("aggregates")
    if not isinstance(aggregates, list):
        return refs
    for agg in aggregates:
        stats = agg.get("stats") if isinstance(agg, dict) else None
        if not isinstance(stats, dict):
            continue
        for value in stats.values():
            if isinstance(value, dict) and isinstance(value.get("npy"), str):
                refs.append(value["npy"])
    return refs


def load_npy(data: bytes) -> np.ndarray:
    """A .npy file whose header matches its size.

    np.load allocates what the header claims before reading a byte (a 129-byte file can
    claim 728 TiB), and would also open a .npz archive or a pickle-bearing object array.
    """
    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError("unsupported .npy version")
    except (ValueError, OSError, EOFError):
        raise ResultRefused("an array file is not a valid .npy file") from None
    if dtype.hasobject or math.prod(shape) * dtype.itemsize != len(data) - fh.tell():
        raise ResultRefused("an array file's header does not match its contents")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError):
        raise ResultRefused("an array file is not a valid .npy file") from None


def marker(stderr_tail: bytes) -> tuple[str, str] | None:
    """(exception type, line) from the entrypoint's last marker line, if any.

    The reason goes back to the researcher and the script can print anything to stderr,
    so only the strict marker form counts, and an exception class the script could have
    named after a data value (``class Age71(Exception)``) is reported generically.
    """
    for line in reversed(stderr_tail.decode("utf-8", "replace").splitlines()):
        m = MARKER_RE.match(line.strip())
        if m:
            kind = m.group(1) if m.group(1) in KNOWN_EXCEPTIONS else "an exception"
            return kind, m.group(2)
    return None


def log_lines(raw: bytes, log_bytes: int) -> list[str]:
    """The last `log_bytes` of the container's output as at most MAX_LOG_LINES lines."""
    text = raw[-log_bytes:].decode("utf-8", "replace")
    lines = text.splitlines()[-MAX_LOG_LINES:]
    return [line[:MAX_LOG_LINE_CHARS] for line in lines]
