"""Which multi-round fits (federated GLMs) this site is taking part in, and what each may
still ask of it.

A round request is the researcher's signed job again (verified again: its catalog,
cohort filter, model and family cannot differ from what was signed), a round number and
the entry's current parameter vector, the only new input. A site answers a later round
only for a job whose first round it released itself, in order, up to the number of
rounds the signed model declares (its most iterations plus the first), and with as many
finite parameters as the model has coefficients. Anything else is refused, saying which
rule.

Kept in memory only: a site that restarts refuses the later rounds of the fits it was
in, so the entry ends those fits (it never finishes one over fewer sites than started).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from stimnet.errors import Refused

# Fits remembered at once; the oldest is forgotten first (its later rounds are refused).
MAX_OPEN_FITS = 4096
# A fit whose next round has not come for this long is forgotten.
IDLE_S = 3600.0


@dataclass
class _Fit:
    max_rounds: int
    p: int
    last: int
    touched: float
    n_released: int | None


class FitRounds:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._fits: collections.OrderedDict[str, _Fit] = collections.OrderedDict()
        self._clock = clock

    def opened(self, job_id: str, *, max_rounds: int, p: int,
               n_released: int | None = None) -> None:
        """Round 1 of `job_id` was released here (under noise, with `n_released` as its
        noised row count, which every later round reports again)."""
        self._fits[job_id] = _Fit(max_rounds, p, 1, self._clock(), n_released)
        while len(self._fits) > MAX_OPEN_FITS:
            self._fits.popitem(last=False)

    def check(self, job_id: str, round_no: int, beta: Sequence[float]) -> int | None:
        """Refused unless round `round_no` at `beta` is the next this site owes `job_id`;
        the fit's noised row count (None without noise)."""
        now = self._clock()
        fit = self._fits.get(job_id)
        if fit is not None and now - fit.touched > IDLE_S:
            del self._fits[job_id]
            fit = None
        if fit is None:
            raise Refused(f"round {round_no} of job {job_id} refused: this site has no fit of "
                          "that job in progress (its first round did not run here, or the fit "
                          "ended or was forgotten)")
        if round_no != fit.last + 1:
            raise Refused(f"round {round_no} of job {job_id} refused: the next round here is "
                          f"{fit.last + 1}")
        if round_no > fit.max_rounds:
            raise Refused(f"round {round_no} of job {job_id} refused: the signed model allows "
                          f"{fit.max_rounds} rounds (its most iterations plus the first)")
        if len(beta) != fit.p or not all(math.isfinite(b) for b in beta):
            raise Refused(f"round {round_no} of job {job_id} refused: its parameter vector "
                          f"must be {fit.p} finite numbers, one per coefficient")
        fit.last = round_no
        fit.touched = now
        if round_no == fit.max_rounds:
            del self._fits[job_id]
        return fit.n_released
