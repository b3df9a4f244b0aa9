"""The fixed failure vocabulary: what a researcher is told keeps none of the script's
choices (names, positions, values), only the site's rule and limits."""

from __future__ import annotations

import pytest

from stimnetd.sandbox.failure import (
    CRASHED,
    INVALID_OUTPUT,
    KINDS,
    OUT_OF_MEMORY,
    TIMED_OUT,
    public_reason,
    rule_of,
)
from stimnetd.sandbox.limits import SandboxLimits


def test_limits_are_the_sites_numbers() -> None:
    lim = SandboxLimits(timeout_s=7, memory_bytes=256 << 20)
    assert public_reason(TIMED_OUT, lim) == "timed out (wall-clock limit 7 s)"
    assert public_reason(OUT_OF_MEMORY, lim) == "out of memory (memory limit 256 MiB)"
    assert public_reason(CRASHED, lim, "script raised KeyError at line 31") == "crashed"
    assert public_reason("anything else", lim) == "crashed"
    assert set(KINDS) >= {TIMED_OUT, OUT_OF_MEMORY, CRASHED, INVALID_OUTPUT}


@pytest.mark.parametrize("message, told", [
    ("aggregate 'age_71': stats 'sum' has non-integer counts",
     "invalid output (stats … has non-integer counts)"),
    ("aggregate #37: n exceeds the catalog's row count",
     "invalid output (n exceeds the catalog's row count)"),
    ("aggregate 'x': m[0,3] outside [n·lo, n·hi] for 'age'",
     "invalid output (m outside [n·lo, n·hi] for …)"),
    ("output exceeded result limit 1 MiB (write refused)",
     "invalid output (output exceeded result limit 1 MiB (write refused))"),
    ("aggregate 'a': not on the catalog's grid (61, 73, 61)",
     "invalid output (not on the catalog's grid (N, N, N))"),
])
def test_an_invalid_output_names_the_rule_only(message: str, told: str) -> None:
    assert public_reason(INVALID_OUTPUT, SandboxLimits(), message) == told


def test_two_different_rule_breaks_at_different_outputs_read_the_same() -> None:
    a = rule_of("aggregate 'subject_17': stats 'sum' contains NaN or infinity")
    b = rule_of("aggregate #902: stats 'mean' contains NaN or infinity")
    assert a == b == "stats … contains NaN or infinity"
