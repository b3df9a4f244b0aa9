"""The fixed vocabulary a script job's failure is told to the researcher in.

Everything a failing script controls (its exception's type and line, its exit status,
how long it ran before dying, the text it printed) can encode data: an exception type and
line number alone carried 29 bits per job per site. So outside `log_policy = "full"` the
researcher learns only which of these few things happened, each worded by the site:

- ``timed out``       the wall-clock limit (the site's number) was reached
- ``out of memory``   the memory limit (the site's number) was reached
- ``crashed``         the script stopped with an error, a signal or a non-zero status
- ``invalid output``  the output broke a rule; the rule is named, never a name, value or
                      index the script chose
- ``cancelled``       the job was cancelled
- ``site error``      the site could not run the job (not the script's doing)

The detailed reason (`SandboxOutcome.reason`) stays in the site's own log.
"""

from __future__ import annotations

import re

from stimnetd.sandbox.limits import SandboxLimits, fmt_bytes, fmt_seconds
from stimnetd.sandbox.result import (
    MAX_AGGREGATES,
    MAX_CROSSPROD_FIELDS,
    MAX_HISTOGRAM_EDGES,
    MAX_VOXELS,
)

TIMED_OUT = "timed out"
OUT_OF_MEMORY = "out of memory"
CRASHED = "crashed"
INVALID_OUTPUT = "invalid output"
CANCELLED = "cancelled"
SITE_ERROR = "site error"
KINDS = (TIMED_OUT, OUT_OF_MEMORY, CRASHED, INVALID_OUTPUT, CANCELLED, SITE_ERROR)

# Where a rule message says which output broke it ("aggregate 'x': ", "aggregate #3: ",
# "output 'x': "): the script chose the name and the position.
_WHERE_RE = re.compile(r"^(?:aggregate (?:#\d+|'[^']*')|output '[^']*'|result): ")
# Quoted as repr() quotes (an apostrophe inside a word, "catalog's", opens nothing).
_QUOTED_RE = re.compile(r"(?<!\w)'[^']*'|\"[^\"]*\"")
# Indices into a matrix ("m[0,3]") say which column failed, and the script picks it.
_INDEX_RE = re.compile(r"\[[\d, ]+\]")
_NUMBER_RE = re.compile(r"\b\d+\b")


def rule_of(message: str) -> str:
    """An invalid-output message with the script's choices taken out: the rule only."""
    rule = _WHERE_RE.sub("", message.strip())
    rule = _QUOTED_RE.sub("…", rule)
    rule = _INDEX_RE.sub("", rule)
    return rule


def public_reason(kind: str, limits: SandboxLimits | None, rule: str = "") -> str:
    """The reason the researcher is told for a failure of `kind` (one of KINDS).

    `rule` is the site-written rule an invalid output broke (passed through `rule_of`);
    numbers in it are the site's limits, kept only where `limits` names them.
    """
    if kind == TIMED_OUT:
        return (f"{TIMED_OUT} (wall-clock limit {fmt_seconds(limits.timeout_s)} s)"
                if limits else TIMED_OUT)
    if kind == OUT_OF_MEMORY:
        return (f"{OUT_OF_MEMORY} (memory limit {fmt_bytes(limits.memory_bytes)})"
                if limits else OUT_OF_MEMORY)
    if kind == INVALID_OUTPUT:
        cleaned = rule_of(rule)
        allowed = _site_numbers(limits)
        # Any number left that is not one of the site's limits is the script's.
        cleaned = _NUMBER_RE.sub(lambda m: m.group(0) if m.group(0) in allowed else "N",
                                 cleaned)
        return f"{INVALID_OUTPUT} ({cleaned})" if cleaned else INVALID_OUTPUT
    if kind in KINDS:
        return kind
    return CRASHED


def _site_numbers(limits: SandboxLimits | None) -> set[str]:
    found = {str(n) for n in (MAX_AGGREGATES, MAX_CROSSPROD_FIELDS, MAX_HISTOGRAM_EDGES,
                               MAX_VOXELS, 0, 1, 2)}
    if limits is not None:
        for text in (fmt_bytes(limits.result_bytes), str(limits.output_files)):
            found.update(_NUMBER_RE.findall(text))
    return found
