"""A job's answer, assembled from the sites' outcomes: combined, finalised, with its manifest.

Pure: the outcomes in, the job's final state and its packed answer out.
"""

from __future__ import annotations

from dataclasses import dataclass

from stimnet import codec
from stimnet.errors import IncompatiblePartials, StimnetError
from stimnet.signing import VerifiedJob
from stimnet.states import JobState
from stimnetd.federation.fanout import FanoutResult
from stimnetd.jobs.scripts import spec_from_partials
from stimnetd.query.combine import combine
from stimnetd.query.result import finalize


@dataclass(frozen=True)
class Answer:
    state: JobState
    detail: str
    # The answer document and its arrays (codec.pack), or None when the job failed.
    packed: bytes | None = None


def assemble(job: VerifiedJob, fan: FanoutResult) -> Answer:
    """The job succeeds when at least `min_sites` sites contributed and their partials
    combine; otherwise it fails, saying which sites did not contribute and why."""
    req = job.request
    contributors = fan.contributors
    missing = fan.missing()
    if len(contributors) < req.min_sites:
        why = "; ".join(f"{site}: {reason}{' (' + detail + ')' if detail else ''}"
                        for site, reason, detail in missing) or (
            f"no site this node knows of holds catalog {req.catalog!r} (`stimctl "
            "catalogs` lists the federation's)")
        return Answer("failed", f"only {len(contributors)} site(s) contributed, "
                      f"min_sites is {req.min_sites} — {why}")
    try:
        combined = combine((o.one_by_one() for o in contributors), [o.site for o in contributors])
        spec = req.query_spec if req.kind == "query" \
            else spec_from_partials(req.catalog, combined)
    except (IncompatiblePartials, StimnetError) as exc:
        return Answer("failed", f"sites returned incompatible results: {exc}")
    result = finalize(spec, combined, consume=True)
    summary = result.to_dict()
    if missing:
        # Loud, not silent: a partial federation answers, and says who is not in it.
        summary.setdefault("notes", []).append(
            f"partial federation: {len(contributors)} of {len(contributors) + len(missing)} "
            f"sites known to hold {req.catalog!r} contributed; not: "
            + ", ".join(f"{site} ({reason})" for site, reason, _ in missing))
    privacy = [{"site": o.site, "epsilon": o.epsilon, "delta": o.delta,
                "mechanism": o.mechanism}
               for o in contributors]
    doc = {"result": summary, "manifest": fan.manifest(), "privacy": privacy,
           "query": req.spec, "scope": req.scope, "kind": req.kind,
           "script_sha256": req.script_sha256 or None}
    return Answer("succeeded", f"{len(contributors)} site(s) contributed",
                  codec.pack(doc, result.arrays))
