"""A job's answer from its sites' outcomes (jobs/answer.py), and the per-researcher query
quota (jobs/quota.py): pure, no store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from stimnet import codec
from stimnet.errors import Overloaded
from stimnet.pki import Identity
from stimnet.query.sql import parse_sql
from stimnet.signing import JobRequest, SignedJob, VerifiedJob
from stimnetd.federation.fanout import FanoutResult
from stimnetd.jobs.answer import Answer, assemble
from stimnetd.jobs.quota import QueryQuota
from stimnetd.query.engine import compute
from stimnetd.site import SiteOutcome
from tests.unit.fakes import FakeCatalog, numeric

ALICE = Identity(name="alice", role="researcher", serial=1,
                 not_after=datetime.now(UTC) + timedelta(days=1))
SPEC = parse_sql("SELECT count(*) FROM c")
CATALOG = FakeCatalog(pd.DataFrame({"x": [float(v) for v in range(12)]}),
                      {"x": numeric("x", 0, 20)}, name="c")


def _job(min_sites: int = 1) -> VerifiedJob:
    req = JobRequest(kind="query", catalog="c", scope="federated", spec=SPEC.to_dict(),
                     min_sites=min_sites, nonce="n" * 32, entry="node-a")
    return VerifiedJob(req, ALICE, SignedJob(req.to_payload(), b"", b""))


def _done(site: str) -> SiteOutcome:
    return SiteOutcome(site, "done", n=12, partials=compute(SPEC, CATALOG).partials)


class TestAssemble:
    def test_too_few_contributors_fail_the_job_naming_each_site(self) -> None:
        """Below min_sites the job fails, saying which sites did not contribute and why."""
        fan = FanoutResult([_done("a"), SiteOutcome("b", "refused", "k_min"),
                            SiteOutcome("c", "timed_out")])
        assert assemble(_job(min_sites=2), fan) == Answer(
            "failed", "only 1 site(s) contributed, min_sites is 2 — b: refused (k_min); "
            "c: timed out")

    def test_no_site_at_all_says_none_holds_the_catalog(self) -> None:
        """An empty fan-out fails, pointing at the catalogs the federation has."""
        assert assemble(_job(), FanoutResult([])) == Answer(
            "failed", "only 0 site(s) contributed, min_sites is 1 — no site this node knows "
            "of holds catalog 'c' (`stimctl catalogs` lists the federation's)")

    def test_contributors_combine_into_the_answer_with_its_manifest(self) -> None:
        """Two sites' counts add up; the manifest lists every site, the privacy list the
        contributors."""
        answer = assemble(_job(min_sites=2), FanoutResult([
            _done("a"), _done("b"), SiteOutcome("c", "failed", "down")]))
        assert (answer.state, answer.detail) == ("succeeded", "2 site(s) contributed")
        doc, _ = codec.unpack(answer.packed or b"")
        assert doc["result"]["rows"] == [[24]]
        assert [(m["site"], m["state"]) for m in doc["manifest"]] == [
            ("a", "done"), ("b", "done"), ("c", "failed")]
        assert doc["privacy"] == [
            {"site": "a", "epsilon": None, "delta": None, "mechanism": None},
            {"site": "b", "epsilon": None, "delta": None, "mechanism": None}]


class TestQueryQuota:
    def test_a_researcher_past_the_limit_is_refused_naming_it(self) -> None:
        """The limit is per researcher (certificate); the refusal names the setting with its
        config section, that every client of the certificate shares it, and what to do."""
        quota = QueryQuota(limit=1)
        quota.reserve("alice")
        quota.reserve("bob")
        with pytest.raises(Overloaded) as refused:
            quota.reserve("alice")
        assert refused.value.args[0] == (
            "you have 1 queries running with this node as their entry, its limit per "
            "researcher ([node] max_queries_per_researcher = 1), shared by every client using "
            "your certificate; wait for one to finish (the limit is on queries running at "
            "once, not per time window), run fewer at once, or ask this node's admin to raise it")

    def test_a_jobs_place_is_given_back_once(self) -> None:
        """Releasing a job twice frees one place, not two."""
        quota = QueryQuota(limit=1)
        quota.reserve("alice")
        quota.hold("j1", "alice")
        quota.release("j1")
        quota.release("j1")
        quota.reserve("alice")
        with pytest.raises(Overloaded):
            quota.reserve("alice")
