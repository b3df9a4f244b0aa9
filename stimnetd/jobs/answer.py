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
    if len(contributors) < req.min_sites:
        why = "; ".join(f"{o.site}: {o.state}{' (' + o.detail + ')' if o.detail else ''}"
                        for o in fan.outcomes if o.state != "done") or (
            f"no site this node knows of holds catalog {req.catalog!r} (`stimctl "
            "catalogs` lists the federation's)")
        return Answer("failed", f"only {len(contributors)} site(s) contributed, "
                      f"min_sites is {req.min_sites} — {why}")
    try:
        combined = combine([o.partials for o in contributors], [o.site for o in contributors])
        spec = req.query_spec if req.kind == "query" \
            else spec_from_partials(req.catalog, combined)
    except (IncompatiblePartials, StimnetError) as exc:
        return Answer("failed", f"sites returned incompatible results: {exc}")
    result = finalize(spec, combined)
    privacy = [{"site": o.site, "epsilon": o.epsilon, "delta": o.delta,
                "mechanism": o.mechanism}
               for o in contributors]
    doc = {"result": result.to_dict(), "manifest": fan.manifest(), "privacy": privacy,
           "query": req.spec, "scope": req.scope, "kind": req.kind,
           "script_sha256": req.script_sha256 or None}
    return Answer("succeeded", f"{len(contributors)} site(s) contributed",
                  codec.pack(doc, result.arrays))
