"""Sandbox entrypoint: runs /job/script.py with `stimnet_runtime` importable.

Started by the daemon as ``python3 -I -B /opt/stimnet/entrypoint.py``: isolated mode, so
no environment variable, user site or current directory can change what gets imported.

A failing script's traceback can quote data (``KeyError: 'patient 0042'``, a printed
frame), and stderr is returned to the researcher, so by default only
``stimnet-runtime: <ExceptionType> at line <N>`` is written; the site can opt in to full
tracebacks (STIMNET_VERBOSE_ERRORS=1, set by the daemon, never by the job).

Zygote mode (STIMNET_ZYGOTE=1, set by the daemon on its pre-started "warm" containers):
before any job exists, import numpy, pandas, nibabel and ``stimnet_runtime`` (the slow
part of a job's start), then wait until the daemon hands a job over by writing
``/job/go`` (after ``script.py`` and ``manifest.json``, each replaced atomically), and
run the script exactly as in the normal mode. The wait is a ``stat`` every few
milliseconds; /job stays read-only to the container. A zygote nobody hands a job to
within STIMNET_ZYGOTE_IDLE_S seconds exits by itself (status 75), so one whose daemon
died does not hold its memory forever; a live daemon recycles it well before that.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback

SCRIPT = os.environ.get("STIMNET_SCRIPT", "/job/script.py")
GO = os.path.join(os.path.dirname(SCRIPT), "go")
MARKER = "stimnet-runtime:"
PRELOAD = ("numpy", "pandas", "nibabel", "stimnet_runtime")
GO_POLL_S = 0.004
IDLE_EXIT_STATUS = 75


def _script_line(exc: BaseException) -> int:
    if isinstance(exc, SyntaxError) and exc.filename == SCRIPT:
        return exc.lineno or 0
    line = 0
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == SCRIPT:
            line = lineno
    return line


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the script meets the same error if it imports it
            continue


def _await_job(idle_s: float) -> bool:
    """Block until the daemon hands a job over (True) or `idle_s` passes (False)."""
    deadline = time.monotonic() + idle_s
    while not os.path.exists(GO):
        if time.monotonic() >= deadline:
            return False
        time.sleep(GO_POLL_S)
    return True


def main() -> int:
    # A failed script may leave aggregates it emitted before failing in /out; the runner
    # reads /out only after exit status 0, so they are never released, and leaving them
    # lets the runner see how much the script wrote.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    verbose = os.environ.get("STIMNET_VERBOSE_ERRORS") == "1"
    if os.environ.pop("STIMNET_ZYGOTE", "") == "1":
        idle_s = float(os.environ.pop("STIMNET_ZYGOTE_IDLE_S", "3600"))
        _preload()
        if not _await_job(idle_s):
            return IDLE_EXIT_STATUS
    try:
        with open(SCRIPT, "rb") as fh:
            source = fh.read()
        code = compile(source, SCRIPT, "exec", dont_inherit=True)
        namespace = {"__name__": "__main__", "__file__": SCRIPT, "__builtins__": __builtins__}
        exec(code, namespace)  # noqa: S102 - running the job script is the point
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        return status & 0xFF
    except BaseException as exc:  # noqa: BLE001 - every failure is reported the same way
        if verbose:
            traceback.print_exception(exc)
        else:
            sys.stderr.write(f"{MARKER} {type(exc).__name__} at line {_script_line(exc)}\n")
        return 1
    return 0


if __name__ == "__main__":
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        # Skips atexit hooks and finalizers the script may have registered to run after
        # the result was judged.
        os._exit(status)
