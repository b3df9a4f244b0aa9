"""Reading a Kubernetes job's output frame (the last log line `kubewrap.py` writes),
trusting none of it.

The frame is read with a byte cap, decoded into a fresh private directory, and then read
by the same `outputs.read_outputs` a Docker job's /out goes through, so every rule
(regular files only, *.npy names, the result cap, .npy headers) is the same one. Reasons
never quote a file name the script chose.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from stimnetd.sandbox.limits import fmt_bytes
from stimnetd.sandbox.outputs import NPY_NAME_RE, RESULT_NAME, ResultRefused, read_outputs

FRAME = "stimnet-out-v1 "


def frame_cap(result_bytes: int) -> int:
    """How many bytes of log the frame may take: base64 of `result_bytes`, JSON around it."""
    return FRAME_OVERHEAD + 4 * ((result_bytes + 2) // 3) + 64 * 1024


FRAME_OVERHEAD = 1024


def split_frame(log: str) -> tuple[str, str | None]:
    """(the script's own log, the frame's JSON or None) from the container log's tail."""
    head, sep, tail = log.rpartition("\n" + FRAME)
    if not sep:
        if log.startswith(FRAME):
            return "", log[len(FRAME):]
        return log, None
    return head, tail


def decode_frame(body: str | None, cap: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The result and its arrays from a frame's JSON; ResultRefused naming the rule."""
    if body is None:
        raise ResultRefused("script emitted no aggregates (no result file)")
    if len(body) > frame_cap(cap):
        raise ResultRefused(f"output exceeded result limit {fmt_bytes(cap)}")
    try:
        files = json.loads(body)
    except (ValueError, RecursionError):
        raise ResultRefused("the job's output frame is not valid (truncated or garbled)") from None
    if not isinstance(files, dict):
        raise ResultRefused("the job's output frame is not valid (not an object)")
    decoded: dict[str, bytes] = {}
    total = 0
    for name, data in files.items():
        if data is None:
            raise ResultRefused("the output directory held something other than a regular file")
        if not isinstance(name, str) or not (name == RESULT_NAME or NPY_NAME_RE.fullmatch(name)):
            raise ResultRefused("the output directory held a file that is not result.json "
                                "or a plain *.npy name: refused")
        if not isinstance(data, str):
            raise ResultRefused("the job's output frame is not valid (not base64)")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ResultRefused("the job's output frame is not valid (not base64)") from None
        total += len(raw)
        if total > cap:
            raise ResultRefused(f"output exceeded result limit {fmt_bytes(cap)}")
        decoded[name] = raw
    with tempfile.TemporaryDirectory(prefix="stimnet-kubeout-") as tmp:
        out = Path(tmp)
        for name, raw in decoded.items():
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
        return read_outputs(out, cap)
