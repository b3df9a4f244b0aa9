"""Centred release of moments and cross-products: the same ε, smaller noise.

A field clamped to its declared bounds [lo, hi] moves a sum by at most B = max(|lo|, |hi|)
per subject, but x − c, with c = (lo + hi) / 2, moves it by at most h = (hi − lo) / 2 ≤ B.
So instead of Σx, Σx² (sensitivities B, B²) the site noises

    S1 = Σ(x − c)                 sensitivity h
    S2 = Σ((x − c)² − h²/2)       sensitivity h²/2   ((x − c)² lies in [0, h²])

with the same ε shares, and releases what the entry expects, rebuilt from the *noised*
values only (post-processing, so no further privacy cost):

    s1 = S1 + c·n̂        s2 = S2 + (h²/2)·n̂ + 2c·s1 − c²·n̂        (n̂ the noised count)

The rebuild is exact algebra, so s1/n̂ = c + S1/n̂ and (s2 − s1²/n̂) = (S2 + (h²/2)·n̂) −
S1²/n̂: a mean's and a variance's error are those of the centred sums. For a mean of
ages in [18, 90] the sum's noise scale drops from 90/ε₁ to 36/ε₁, and a variance's
squares from 8100/ε₂ to 648/ε₂, before the gain from not cancelling large uncentred sums.

A cross-product matrix m = Σ z zᵀ, z = (1, x₁, …, x_k), is released as m_c = A m Aᵀ with
z_c = A z = (1, x₁ − c₁, …, x_k − c_k), sensitivity Σ_{i≤j} h_i h_j (h₀ = 1), and rebuilt
as A⁻¹ m̂_c A⁻ᵀ: a regression's slopes and a correlation are functions of the centred
matrix alone.

Only the outputs whose result is shift-invariant given the rebuild are centred: `avg`,
`variance`, `stddev`, `corr` and regressions. A `sum` is not (its rebuild would add c
times the count's noise), and neither is anything whose field has no declared bounds
(those are refused before this, in noise.sensitivities).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from stimnet.query.fields import FieldMeta
from stimnetd.query.aggregate import Partial

# Moments outputs whose finalised value reads s1 / n (and s2) only through a shift-
# invariant formula.
CENTRED_MOMENTS = frozenset({"mean", "var", "sd"})


@dataclass(frozen=True)
class Centring:
    """How one partial is centred: the centres c and half-widths h of its fields."""

    kind: str
    centres: tuple[float, ...]
    halves: tuple[float, ...]

    def sensitivities(self, sens: Mapping[str, float]) -> dict[str, float]:
        """`sens` (noise.sensitivities, already planned) with the centred arrays' values."""
        out = dict(sens)
        if self.kind == "moments":
            h = self.halves[0]
            if "s1" in out:
                out["s1"] = h
            if "s2" in out:
                out["s2"] = h * h / 2
        else:
            hs = (1.0, *self.halves)
            out["m"] = float(sum(hs[i] * hs[j] for i in range(len(hs))
                                 for j in range(i, len(hs))))
        return out

    def centre(self, stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The exact centred arrays, from the exact uncentred ones."""
        out = {k: np.array(v, dtype=np.float64) for k, v in stats.items()}
        if self.kind == "moments":
            c, h = self.centres[0], self.halves[0]
            n, s1, s2 = out["n"], out["s1"], out["s2"]
            out["s1"] = s1 - c * n
            out["s2"] = s2 - 2 * c * s1 + c * c * n - (h * h / 2) * n
        else:
            a = self._shift(-1.0)
            out["m"] = a @ out["m"] @ a.T
        return out

    def restore(self, noised: Mapping[str, np.ndarray], n_hat: float,
                released: Collection[str]) -> dict[str, np.ndarray]:
        """The uncentred arrays the entry reads, from the noised centred ones and the noised
        count `n_hat`: post-processing of released values only. An array not in `released`
        (an average's s2) stays the zeros it was set to."""
        out = {k: np.array(v, dtype=np.float64) for k, v in noised.items()}
        if self.kind == "moments":
            c, h = self.centres[0], self.halves[0]
            s1 = out["s1"] + c * n_hat
            if "s2" in released:
                out["s2"] = out["s2"] + (h * h / 2) * n_hat + 2 * c * s1 - c * c * n_hat
            out["s1"] = s1
        else:
            a_inv = self._shift(1.0)
            m = a_inv @ out["m"] @ a_inv.T
            out["m"] = (m + m.T) / 2  # exactly symmetric, as the centred release was
        return out

    def _shift(self, sign: float) -> np.ndarray:
        k = len(self.centres)
        a = np.eye(k + 1)
        a[1:, 0] = [sign * c for c in self.centres]
        return a


def centring(p: Partial, fields: Mapping[str, FieldMeta]) -> Centring | None:
    """The centring of `p`, or None when its release stays uncentred."""
    if p.kind == "moments" and p.meta.get("func") in CENTRED_MOMENTS:
        names = [p.meta.get("field")]
    elif p.kind == "crossprod":
        names = list(p.meta.get("fields") or [])
    else:
        return None
    centres, halves = [], []
    for name in names:
        meta = fields.get(name) if isinstance(name, str) else None
        if meta is None or meta.bounds is None:
            return None
        lo, hi = (float(b) for b in meta.bounds)
        centres.append((lo + hi) / 2)
        halves.append((hi - lo) / 2)
    if not names or any(h <= 0 for h in halves):
        return None  # a degenerate range: nothing to gain, keep the plain release
    return Centring(p.kind, tuple(centres), tuple(halves))
