"""Job commands (query, submit, jobs, job, results, cancel, approve, deny)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: Any, node_cmd: Callable[..., argparse.ArgumentParser]) -> None:
    """Added by the jobs layer."""
