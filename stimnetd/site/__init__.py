"""Site execution: this node's share of a job, computed on its own data and released through
the privacy layer. Both the entry's fan-out and a peer's sub-job run a share through here.

    local.py     LocalSite: precheck, compute, suppress, noise, release (one transaction)
    cohorts.py   CohortFingerprints: the HMAC'd cohorts the overlap guard compares
    outcome.py   SiteOutcome: what a share came to
"""

from stimnetd.site.local import LocalSite, ScriptRunner, ShareProgress
from stimnetd.site.outcome import SiteOutcome

__all__ = ["LocalSite", "ScriptRunner", "ShareProgress", "SiteOutcome"]
