"""The options of the voxel-wise tests (`tmap`, `tmap2`, `prop_map`, `corr_map`).

Written as SQL named arguments, e.g.
``tmap(vta, improvement_pct, mu => 0, min_frac => 0.1, correction => 'fdr', alpha => 0.05)``.
Sites compute the same per-voxel sums whatever the options say; the options are the entry
node's derivation (stimnetd/query/voxeltests.py), checked here so a spec that travels is
refused whole when one is wrong, naming it.

=============  ==============================================  ==========
option         meaning                                         default
=============  ==============================================  ==========
mu             tmap's null value                               0
min_n          test only voxels covered by at least this many  0
               subjects (tmap2: and not covered by as many)
min_frac       ... or by at least this fraction of the cohort  0
correction     across the tested voxels: fdr_bh (alias fdr,    fdr_bh
               bh), bonferroni or none
alpha          the thresholded map keeps corrected p <= alpha  0.05
=============  ==============================================  ==========
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stimnet.errors import QueryError
from stimnet.numbers import finite_number

VOXEL_TESTS = frozenset({"tmap", "tmap2", "prop_map", "corr_map"})
CORRECTIONS = {"fdr_bh": "fdr_bh", "fdr": "fdr_bh", "bh": "fdr_bh",
               "bonferroni": "bonferroni", "none": "none"}

Options = tuple[tuple[str, float | str], ...]


@dataclass(frozen=True)
class TestSettings:
    """A test's options with their defaults filled in (correction by its canonical name)."""

    mu: float = 0.0
    min_n: int = 0
    min_frac: float = 0.0
    correction: str = "fdr_bh"
    alpha: float = 0.05

    @classmethod
    def of(cls, options: Options) -> TestSettings:
        d = dict(options)
        return cls(mu=float(d.get("mu", 0.0)), min_n=int(d.get("min_n", 0)),
                   min_frac=float(d.get("min_frac", 0.0)),
                   correction=CORRECTIONS[str(d.get("correction", "fdr_bh"))],
                   alpha=float(d.get("alpha", 0.05)))


def check_options(name: str, func: str, options: Options, allowed: frozenset[str]) -> None:
    """Refuse an option `func` does not take, or a value outside its range."""
    for key, value in options:
        if key not in allowed:
            takes = f"takes {', '.join(sorted(allowed))}" if allowed else "takes no options"
            raise QueryError(f"{name}: unknown option {key!r}; {func} {takes}")
        if key == "correction":
            if value not in CORRECTIONS:
                raise QueryError(f"{name}: correction must be one of "
                                 f"{', '.join(sorted(CORRECTIONS))}, got {value!r}")
            continue
        if not finite_number(value):
            raise QueryError(f"{name}: option {key} must be a finite number")
        if key == "min_n" and (value != int(value) or value < 0):
            raise QueryError(f"{name}: min_n must be a whole number of subjects, at least 0")
        if key == "min_frac" and not 0 <= value <= 1:
            raise QueryError(f"{name}: min_frac must be a fraction of the cohort in [0, 1]")
        if key == "alpha" and not 0 < value < 1:
            raise QueryError(f"{name}: alpha must be in (0, 1)")
    keys = [k for k, _ in options]
    if len(set(keys)) != len(keys) or keys != sorted(keys):
        raise QueryError(f"{name}: options must be distinct and sorted by name")


def options_from_dict(d: Any) -> Options:
    """`{"min_n": 10, ...}` as the sorted pairs an AggSpec holds (values checked there)."""
    if not isinstance(d, Mapping):
        raise QueryError("aggregate options must be an object")
    out: list[tuple[str, float | str]] = []
    for key, value in sorted(d.items()):
        if not isinstance(key, str) or not isinstance(value, int | float | str) \
                or isinstance(value, bool):
            raise QueryError(f"aggregate option {key!r:.40} must be a number or a string")
        out.append((key, value))
    return tuple(out)
