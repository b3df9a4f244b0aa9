"""Sample-and-aggregate: a DP release of an untrusted script's outputs.

A script under differential privacy is not trusted to bound any subject's influence on
what it emits (it may write one subject's value, scaled, into a declared mean). So the
site never noises what the script claims. Instead (Nissim, Raskhodnikova and Smith 2007;
GUPT, Mohan et al. 2012):

1. The cohort is split into B disjoint blocks by a keyed hash of each subject id (`assign`):
   data-independent, and adding or removing one subject changes one block only.
2. The script runs once per block, seeing that block's rows and files only (jobs/blocks.py).
3. Each declared output of each block is reduced to one number, its block's estimate of the
   cohort's statistic (`block_value`), and clamped to the range the job declared with it;
   a block that failed, timed out, emitted nothing usable, or has no value for a cell
   counts as the range's midpoint.
4. The B numbers are averaged: one subject moves the average by at most (hi - lo) / B,
   whatever the script does, so Laplace noise of scale (hi - lo) / (B·ε) makes it ε-DP.
   ε is split evenly over every output cell (sequential composition: one subject's block
   computes all of them). The release is pure ε-DP (δ = 0) and passes no k_min gate: what
   is released does not depend on which cells are small.

B is a function of the catalog's subject count, which the site publishes (`stimctl
catalogs`): the guarantee is for neighbouring datasets split into the same B blocks. A
count's and a sum's block estimate is B times the block's own (the cohort's total, not a
block's), so every declared range is a range of the cohort's statistic.

The released values are encoded as the ordinary partials of their function (`_encode`),
weighted by B, so the entry combines sites as it combines any answer: a mean across sites
is the mean over all their blocks; counts and sums add.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from stimnet.query.fields import FieldMeta
from stimnet.query.spec import AggSpec, QuerySpec
from stimnetd.privacy.noise import MAX_SCALE, ArrayNoise, NoiseReport, NoiseSource
from stimnetd.privacy.policy import PrivacyRefusal
from stimnetd.query.aggregate import GroupKey, Partial

# What a block's output can be reduced to one number for; the rest (histograms, maps,
# regressions) would need a vector release per block, which this module does not do.
BLOCK_FUNCS = ("count", "sum", "mean", "var", "sd", "corr")
# Meta key on a released partial: the number of blocks its value averages.
BLOCKS = "blocks"
# The released stat's name in the noise report (one number per output cell).
VALUE = "value"


def require_ranges(spec: QuerySpec | None, catalog: str) -> QuerySpec:
    """The declaration a noised script job needs: every output a scalar with a range.
    PrivacyRefusal("dp") naming what is missing otherwise."""
    example = (f"e.g. --outputs \"SELECT clamp(avg(age), 18, 100) AS mean_age FROM {catalog}\"")
    if spec is None:
        raise PrivacyRefusal("dp", "under differential privacy a script's outputs are released "
                             "by sample-and-aggregate and must be declared, each with its "
                             f"range: {example}")
    for a in spec.aggregates:
        if a.func not in BLOCK_FUNCS:
            raise PrivacyRefusal("dp", f"output {a.name!r}: under differential privacy a "
                                 f"script's outputs are released by sample-and-aggregate, "
                                 f"which takes {', '.join(BLOCK_FUNCS)}, not {a.func}")
    missing = [a.name for a in spec.aggregates if a.range is None]
    if missing:
        raise PrivacyRefusal("dp", "under differential privacy each declared output of a "
                             "script needs a range its value is clamped to (sample-and-"
                             f"aggregate); none for {', '.join(repr(m) for m in missing)}: "
                             f"declare it with clamp(), {example}")
    for a in spec.aggregates:
        assert a.range is not None
        if not math.isfinite(a.range[1] - a.range[0]):
            raise PrivacyRefusal("dp", f"output {a.name!r}: its range is too wide to noise")
    return spec


def assign(ids: Iterable[str], key: bytes, blocks: int) -> list[list[str]]:
    """The subjects of each of `blocks` blocks: HMAC-SHA256(key, id) mod blocks, so a
    subject's block depends on its id and the site's secret only, never on the data."""
    out: list[list[str]] = [[] for _ in range(blocks)]
    for sid in ids:
        digest = hmac.new(key, sid.encode(), hashlib.sha256).digest()
        out[int.from_bytes(digest[:8], "big") % blocks].append(sid)
    return out


def cells(spec: QuerySpec, fields: Mapping[str, FieldMeta]) -> list[GroupKey]:
    """Every group cell of the declaration (its group fields' declared levels)."""
    return [tuple(c) for c in itertools.product(
        *[[(f, lv) for lv in (fields[f].levels or ())] for f in sorted(spec.group_by)])]


def block_value(agg: AggSpec, p: Partial | None, blocks: int) -> float | None:
    """One block's estimate of `agg` over the cohort, from what it emitted; None when it
    emitted nothing usable for it (the caller then uses the default)."""
    if p is None:
        return None
    s = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in p.stats.items()}
    if agg.func == "count":
        return float(s["n"][0]) * blocks
    if agg.func == "corr":
        m = np.asarray(p.stats["m"], dtype=np.float64)
        n = m[0, 0]
        if n <= 1:
            return None
        sxx, syy = m[1, 1] - m[0, 1] ** 2 / n, m[2, 2] - m[0, 2] ** 2 / n
        sxy = m[1, 2] - m[0, 1] * m[0, 2] / n
        return float(sxy / math.sqrt(sxx * syy)) if sxx > 0 and syy > 0 else None
    n, s1, s2 = float(s["n"][0]), float(s["s1"][0]), float(s["s2"][0])
    if agg.func == "sum":
        return s1 * blocks
    if agg.func == "mean":
        return s1 / n if n > 0 else None
    if n <= 1:
        return None
    var = max(0.0, (s2 - s1 * s1 / n) / (n - 1))
    return var if agg.func == "var" else math.sqrt(var)


def release(spec: QuerySpec, group_cells: Sequence[GroupKey],
            per_block: Sequence[Sequence[Partial] | None], epsilon: float,
            noise: NoiseSource, *, n_subjects: int) -> tuple[list[Partial], NoiseReport]:
    """The noisy block means of every declared output cell, as partials, and the ε spent.
    `per_block[b]` is block b's checked result, or None when it failed."""
    blocks = len(per_block)
    targets = [(a, g) for a in spec.aggregates for g in group_cells]
    share = epsilon / len(targets)
    widest = max(_width(a) for a, _ in targets) / blocks / share
    if widest > MAX_SCALE:
        raise PrivacyRefusal("dp", f"epsilon {epsilon:g} is too small for these outputs' "
                             f"ranges: the noise would have scale {widest:.3g}, beyond the "
                             f"{MAX_SCALE:.3g} the samplers represent exactly")
    index = [{p.key: p for p in parts} if parts is not None else None for parts in per_block]
    out: list[Partial] = []
    report: list[ArrayNoise] = []
    for a, g in targets:
        assert a.range is not None
        lo, hi = a.range
        values = [block_value(a, None if ix is None else ix.get((a.name, g)), blocks)
                  for ix in index]
        clamped = [min(hi, max(lo, (lo + hi) / 2 if v is None or not math.isfinite(v) else v))
                   for v in values]
        sensitivity = (hi - lo) / blocks
        scale = sensitivity / share
        noisy = float(noise.laplace(np.asarray([math.fsum(clamped) / blocks]), scale)[0])
        # Back into the range: post-processing, so free, and it bounds the error.
        value = min(hi, max(lo, noisy))
        report.append(ArrayNoise(a.name, g, VALUE, "laplace", sensitivity, share, scale))
        out.append(_encode(a, g, value, blocks, n_subjects))
    return out, NoiseReport(math.fsum(r.epsilon for r in report), tuple(report))


def _width(a: AggSpec) -> float:
    assert a.range is not None
    return a.range[1] - a.range[0]


def _encode(a: AggSpec, g: GroupKey, value: float, blocks: int, n_subjects: int) -> Partial:
    """`value` as the partial of `a.func` that finalises to it, weighted by `blocks` so
    that sites combine into the mean over all their blocks (counts and sums add)."""
    meta = {BLOCKS: blocks, "func": a.func, "range": list(a.range or ())}
    w = float(blocks)
    if a.func == "count":
        return Partial(a.name, "count", g, n_subjects, {"n": np.asarray([float(round(value))])},
                       meta)
    if a.func == "corr":
        m = np.asarray([[w, 0.0, 0.0], [0.0, w, w * value], [0.0, w * value, w]])
        return Partial(a.name, "crossprod", g, n_subjects, {"m": m},
                       {**meta, "fields": list(a.fields), "purpose": "corr"})
    field = {"field": a.fields[0]}
    if a.func == "sum":
        stats = {"n": [w], "s1": [value], "s2": [0.0]}
    elif a.func == "mean":
        stats = {"n": [w], "s1": [w * value], "s2": [0.0]}
    else:  # var, sd: a weighted mean of variances (query/result.py reads s2 / n)
        variance = value if a.func == "var" else value * value
        stats = {"n": [w], "s1": [0.0], "s2": [w * variance]}
    return Partial(a.name, "moments", g, n_subjects,
                   {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()},
                   {**meta, **field})
