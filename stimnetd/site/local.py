"""This site's share of one verified job: computed on its data, released through the privacy layer.

Order matters and is fixed here: compute → k_min suppression → DP noise → (in one store
transaction) overlap guard, budget charge, release record, audit entry. Nothing leaves the
site unless that transaction committed; a job released before (a retry after a crash)
returns the stored release, so it is never charged or noised twice.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from stimnet import codec
from stimnet.errors import InvalidRequest, QueryError, Refused, Replayed, StimnetError, StorageFull
from stimnet.query.fields import Grid
from stimnet.query.spec import AggSpec
from stimnet.signing import VerifiedJob
from stimnet.states import RefusalKind
from stimnetd import memtrim
from stimnetd.catalog import Catalog, CatalogSet
from stimnetd.privacy import glm_noise
from stimnetd.privacy.noise import NoiseReport, NoiseSource, add_noise
from stimnetd.privacy.policy import PrivacyPolicy, PrivacyRefusal, decide_epsilon
from stimnetd.privacy.release import budget_refusal, decide
from stimnetd.privacy.suppress import Decision, is_withheld, result_suppressed, suppress_small_cells
from stimnetd.privacy.tails import withhold_tails
from stimnetd.privacy.threshold import gate_noised
from stimnetd.query import partial_docs
from stimnetd.query.aggregate import GroupKey, Partial
from stimnetd.query.engine import compute
from stimnetd.query.linear import LinearCohort
from stimnetd.query.models import control_of, is_multi_round, rounds_of
from stimnetd.query.plan import refuse_too_large
from stimnetd.query.subjects import SubjectImages
from stimnetd.site.blocks import BlockScripts, require_noised, sample_aggregate
from stimnetd.site.cohorts import CohortFingerprints
from stimnetd.site.outcome import SiteOutcome, beside_loop, lean, pack_release
from stimnetd.site.released import cell_shown, declared_groups_only
from stimnetd.site.rounds import FitRounds
from stimnetd.store import NonceClaim, SiteStore
from stimnetd.store.records import Release
from stimnetd.store.space import StorageGuard

log = structlog.get_logger("stimnetd.site")

# A table query over at most this many subjects runs on the event loop: handing a small
# one to a thread costs more than computing it (a hop each way, and the thread and the
# loop trading the GIL). Image aggregates and larger catalogs use a worker thread, so
# health checks and other RPCs stay responsive.
INLINE_SUBJECTS = 5_000

# Error codes that mean the site refused the job (audited as a refusal), not that it failed.
_REFUSING_CODES = frozenset({"NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                             "PERMISSION_DENIED", "INVALID_ARGUMENT"})


async def _started() -> None:
    return None


async def _no_log(line: str) -> None:
    return None


@dataclass(frozen=True)
class ShareProgress:
    """Where a share running here reports before its outcome: that it started (a script's
    container), and each log line the site's log policy lets through."""

    running: Callable[[], Awaitable[None]] = _started
    log: Callable[[str], Awaitable[None]] = _no_log


class ScriptRunner(BlockScripts, Protocol):
    """Runs a script job's script on a catalog (jobs/scripts.SandboxScripts)."""

    async def __call__(self, job: VerifiedJob, catalog: Catalog,
                       on_log: Callable[[str], Awaitable[None]]
                       ) -> tuple[list[Partial], frozenset[str] | None]:
        """(partials, cohort subject ids or None when the site cannot know the cohort)"""


class LocalSite:
    """This node as a site: runs its share of a job (the entry's own, or a peer's sub-job)."""

    def __init__(self, *, name: str, catalogs: CatalogSet, store: SiteStore, policy: PrivacyPolicy,
                 noise: NoiseSource, overlap_guard: bool = True,
                 shared_history: bool = False,
                 script_runner: ScriptRunner | None = None,
                 on_decision: Callable[[str], None] = lambda kind: None,
                 storage: StorageGuard | None = None,
                 clock: Callable[[], float] = time.time,
                 images: SubjectImages | None = None) -> None:
        self.name = name
        # Where voxel maps' per-subject work runs ([compute] scheduler; None: in-process).
        self._images = images
        self._catalogs = catalogs
        self._store = store
        self._policy = policy
        self._noise = noise
        self._overlap_guard = overlap_guard
        # One exact-auditing history per catalog for all researchers ([privacy]
        # shared_history), not one per researcher.
        self._shared_history = shared_history
        self._script_runner = script_runner
        self._on_decision = on_decision
        self._clock = clock
        self._storage = storage
        self._fingerprints = CohortFingerprints(store.site_secret)
        # The multi-round fits (GLMs) whose first round this site released.
        self.rounds = FitRounds()

    @property
    def k_min(self) -> int:
        return self._policy.k_min

    def grid(self, catalog: str) -> Grid | None:
        """This site's reference space for `catalog` (Catalog.grid)."""
        return self._catalogs.get(catalog).grid()

    async def precheck(self, job: VerifiedJob) -> None:
        """Refuse early what is certain to be refused: unknown catalog, bad epsilon, or a
        budget already too small. The release transaction re-checks the budget, so this
        is a courtesy to the researcher (a clear status at once), not the guarantee."""
        req = job.request
        catalog = self._catalogs.get(req.catalog)
        await self.check_storage(job.researcher.name)
        if req.kind == "query" and self._storage is not None:
            refuse_too_large(req.query_spec, catalog, self._storage.max_answer_mb)
        declared = None
        if req.kind == "script" and self._script_runner is not None:
            try:
                declared = self._script_runner.declaration(job, catalog)
            except QueryError as exc:
                raise InvalidRequest(f"declared outputs refused: {exc}") from None
        epsilon = decide_epsilon(self._policy, req.epsilon)
        if req.kind == "script" and self._script_runner is not None and epsilon is not None:
            require_noised(self._script_runner, declared, catalog.name)
        if epsilon is not None:
            spent = await self._store.spent(job.researcher.name, req.catalog)
            refusal = budget_refusal(req.catalog, epsilon, spent, self._policy)
            if refusal is not None:
                raise refusal.error()

    async def check_storage(self, researcher: str) -> None:
        """Refuse a job whose answer this node could not keep (store/space.py)."""
        if self._storage is not None:
            await self._storage.check(researcher)

    async def run(self, job: VerifiedJob, progress: ShareProgress | None = None, *,
                  resumed: bool = False, nonce: NonceClaim | None = None) -> SiteOutcome:
        """`resumed`: the job ran here before (re-queued after a restart), so a release it
        already made is returned as is. A fresh job cannot have one: its job id derives
        from a nonce this site has only just accepted.

        `nonce`: the request's nonce is remembered in the transaction that records the
        outcome (release or refusal); a replay raises `Replayed` instead of an outcome."""
        req = job.request
        progress = progress or ShareProgress()
        try:
            if resumed:
                existing = await self._store.get_release(req.job_id)
                if existing is not None:
                    return self._from_release(existing)
            catalog = self._catalogs.get(req.catalog)
            epsilon = decide_epsilon(self._policy, req.epsilon)
            if req.kind != "query":
                # A query runs the moment it is accepted, in milliseconds: a separate
                # "running" event would only cost every hop a message. A script's start
                # (a container) is worth reporting.
                await progress.running()
            _model_privacy(job, catalog, epsilon)
            if req.kind == "script" and epsilon is not None and self._script_runner is not None:
                return await self._sample_aggregate(self._script_runner, job, catalog, epsilon, nonce)
            audit = epsilon is None and self._overlap_guard
            partials, cohort, groups, linear = await self._compute(job, catalog, progress, audit,
                                                                   clamp=epsilon is not None)
            outcome = await self._release(job, catalog, partials, cohort, groups, epsilon, nonce,
                                          linear)
            self._open_rounds(job, outcome, partials)
            if partials and not outcome.partials:  # large arrays, now kept packed only
                del partials
                await memtrim.trim_now()
            return outcome
        except Replayed:
            raise
        except StorageFull as exc:
            # Nothing was released or charged (the transaction did not commit), and a
            # refusal could not be audited either: the share failed, saying why.
            return SiteOutcome(self.name, "failed", str(exc))
        except (PrivacyRefusal, QueryError) as exc:
            await self._audit_refusal(job, exc, nonce)
            return SiteOutcome(self.name, "refused", str(exc))
        except StimnetError as exc:
            if exc.code not in _REFUSING_CODES:
                return SiteOutcome(self.name, "failed", str(exc))
            await self._audit_refusal(job, exc, nonce)
            return SiteOutcome(self.name, "refused", str(exc))
        except Exception:  # noqa: BLE001 - a site failure is reported, not propagated
            log.exception("site job failed", job=req.job_id)
            return SiteOutcome(self.name, "failed", "internal error at this site (see its logs)")

    def _open_rounds(self, job: VerifiedJob, outcome: SiteOutcome,
                     partials: list[Partial]) -> None:
        """A multi-round fit's first round released here: later rounds may follow."""
        req = job.request
        if outcome.state == "done" and req.kind == "query" \
                and is_multi_round(model := req.query_spec.model):
            assert model is not None
            self.rounds.opened(req.job_id, max_rounds=rounds_of(model),
                               p=len(partials[0].meta["terms"]),
                               n_released=outcome.n if outcome.epsilon else None)

    async def run_round(self, job: VerifiedJob, round_no: int,
                        beta: list[float]) -> SiteOutcome:
        """Round `round_no` (2 or later) of a multi-round job whose first round this site
        released: the same signed job evaluated at `beta`, under the same k_min rule as
        a query. Refused (and audited) unless `rounds` says this round is owed."""
        req = job.request
        try:
            if req.kind != "query" or not is_multi_round(req.query_spec.model):
                raise Refused(f"round {round_no} of job {req.job_id} refused: the signed job "
                              "is not a multi-round model")
            n_released = self.rounds.check(req.job_id, round_no, beta)
            catalog = self._catalogs.get(req.catalog)
            spec = req.query_spec
            arr = np.asarray(beta, dtype=np.float64)
            if catalog.n_subjects <= INLINE_SUBJECTS:
                result = compute(spec, catalog, beta=arr)
            else:
                result = await asyncio.to_thread(compute, spec, catalog, beta=arr)
            epsilon = decide_epsilon(self._policy, req.epsilon)
            if epsilon is not None:
                # Gated by round 1's noised n; charged, for every round the model allows,
                # with round 1 (glm_noise). No exact check here: it would not be DP.
                assert spec.model is not None
                partials = [glm_noise.noised(result.partials[0], _glm_plan(
                    spec.model, catalog, epsilon), self._noise, n_released)[0]]
            else:
                partials, decisions = suppress_small_cells(result.partials, self._policy.k_min,
                                                           catalog.fields)
                partials = [withhold_tails(p, self._policy.k_min) for p in partials]
                if result_suppressed(decisions):
                    # The cohort is the first round's, which passed k_min: only a site
                    # whose data changed mid-fit gets here.
                    raise Refused(f"round {round_no} of job {req.job_id}: every output was "
                                  f"withheld (k_min = {self._policy.k_min})")
            await self._store.audit(job.researcher.name, job.researcher.role, "release",
                                    "released", {"job": req.job_id, "catalog": req.catalog,
                                                 "kind": partials[0].kind, "round": round_no,
                                                 "noised": epsilon is not None,
                                                 "epsilon": 0.0 if epsilon else None})
            self._on_decision("released")
            return SiteOutcome(self.name, "done", "", n=partials[0].n, partials=partials)
        except (PrivacyRefusal, QueryError) as exc:
            await self._audit_refusal(job, exc, None)
            return SiteOutcome(self.name, "refused", str(exc))
        except StimnetError as exc:
            if exc.code not in _REFUSING_CODES:
                return SiteOutcome(self.name, "failed", str(exc))
            await self._audit_refusal(job, exc, None)
            return SiteOutcome(self.name, "refused", str(exc))
        except Exception:  # noqa: BLE001 - a site failure is reported, not propagated
            log.exception("site round failed", job=req.job_id, round=round_no)
            return SiteOutcome(self.name, "failed", "internal error at this site (see its logs)")

    async def _audit_refusal(self, job: VerifiedJob, exc: Exception,
                             nonce: NonceClaim | None) -> None:
        # The refusing rule when one refused (a RefusalKind), else the error's class.
        kind: RefusalKind | str = getattr(exc, "policy", type(exc).__name__)
        entry = (job.researcher.name, job.researcher.role, "release", "refused",
                 {"job": job.request.job_id, "catalog": job.request.catalog,
                  "policy": kind, "reason": str(exc)})
        if nonce is not None and not nonce.consumed:
            if not await self._store.claim_nonce(nonce, audit=entry):
                raise Replayed("replayed request: this signed job was already run at this site")
        else:
            await self._store.audit(*entry)
        self._on_decision("refused")

    async def _compute(self, job: VerifiedJob, catalog: Catalog, progress: ShareProgress,
                       audit: bool = False, clamp: bool = True
                       ) -> tuple[list[Partial], frozenset[str] | None,
                                  dict[GroupKey, frozenset[str]], list[LinearCohort]]:
        req = job.request
        if req.kind == "query":
            spec = req.query_spec
            if spec.catalog != req.catalog:
                raise QueryError(f"query names catalog {spec.catalog!r} but the job names "
                                 f"{req.catalog!r}")
            # compute() validates the spec against this catalog (a site trusts no entry).
            if not spec.reads_images() and catalog.n_subjects <= INLINE_SUBJECTS:
                result = compute(spec, catalog, images=self._images, audit=audit, clamp=clamp)
            else:
                result = await asyncio.to_thread(compute, spec, catalog, images=self._images,
                                                 audit=audit, clamp=clamp)
            return result.partials, result.cohort_ids, result.group_ids, result.linear
        if self._script_runner is None:
            raise Refused("this site's script policy is 'deny': it does not run researcher scripts")
        partials, cohort = await self._script_runner(job, catalog, progress.log)
        return partials, cohort, {}, []

    async def _sample_aggregate(self, scripts: ScriptRunner, job: VerifiedJob, catalog: Catalog,
                                epsilon: float, nonce: NonceClaim | None) -> SiteOutcome:
        partials, report = await sample_aggregate(
            scripts, job, catalog, epsilon, split=self._policy.blocks, noise=self._noise,
            secret=await self._store.site_secret())
        return await self._release(job, catalog, partials, None, {}, epsilon, nonce, report=report)

    async def _release(self, job: VerifiedJob, catalog: Catalog, partials: list[Partial],
                       cohort: frozenset[str] | None, groups: dict[GroupKey, frozenset[str]],
                       epsilon: float | None, nonce: NonceClaim | None = None,
                       linear: list[LinearCohort] | None = None,
                       report: NoiseReport | None = None) -> SiteOutcome:
        """Suppress, noise, and release in one store transaction (see `_disclosed` for the
        cohorts the overlap guard checks). `report`: the partials are noised already
        (sample-and-aggregate): pure ε-DP, with no threshold to gate them or charge δ for."""
        req = job.request
        if report is None:
            partials, decisions, report = await beside_loop(partials, self._protect, job,
                                                            catalog, partials, epsilon)
        else:
            decisions = [Decision(p.name, p.group, "released") for p in partials]
        suppressed = result_suppressed(decisions)
        decision = _decision(suppressed, decisions)
        charged = report.epsilon if report is not None and report.epsilon > 0 else None
        delta = self._policy.delta if charged is not None and req.kind == "query" else 0.0
        if charged is None:
            cells, cohort = _disclosed(partials, cohort, groups)
            guarded = tuple([await self._fingerprints.of(catalog, c) for c in cells])
            fingerprint, digest = (await self._fingerprints.of(catalog, cohort)
                                   if cohort is not None else (frozenset(), None))
        else:
            # A noised release is not audited against later ones (its epsilon accounts for
            # it), so its cohorts are neither fingerprinted nor recorded.
            cells, cohort, guarded, fingerprint, digest = [], None, (), frozenset(), None
        n_atoms = len(cells) - 1 if len(cells) > 1 else 0  # the cells, not their union
        audited = await self._linear(catalog, partials, linear) \
            if charged is None and linear else ()
        n = _released_n(partials, cohort, suppressed, charged is not None)
        mechanism = "laplace" if charged else None
        blob = await beside_loop(partials, pack_release, partials, {
            "n": n, "epsilon": charged, "delta": delta or None, "mechanism": mechanism})
        stored = await self._store.release(
            Release(job_id=req.job_id, researcher=job.researcher.name, catalog=req.catalog,
                    decision=decision, epsilon=charged, cohort=fingerprint, partials=blob,
                    cohort_key=digest, guarded=guarded, atoms=guarded[:n_atoms],
                    at=self._clock(), delta=delta, linear=audited,
                    shared_history=self._shared_history,
                    audit_detail={"kind": req.kind, "outputs": len(partials),
                                  "withheld": [f"{d.output}{list(d.group)}: {d.reason}"
                                               for d in decisions if d.action != "released"]}),
            decide=functools.partial(decide, policy=self._policy,
                                     overlap_guard=self._overlap_guard),
            audit_actor=(job.researcher.name, job.researcher.role), nonce=nonce)
        self._on_decision(stored.decision)
        if stored.partials is not blob:  # released before (a retry): the stored one counts
            return self._from_release(stored)
        return self._outcome(decision, partials, n, charged, mechanism, blob, delta or None)

    def _protect(self, job: VerifiedJob, catalog: Catalog, partials: list[Partial],
                 epsilon: float | None
                 ) -> tuple[list[Partial], list[Decision], NoiseReport | None]:
        """k_min suppression on exact counts, or under DP noise and then the noisy threshold
        (privacy/threshold.py): which cells are withheld is decided on noised counts, so it
        is inside the DP guarantee."""
        k = self._policy.k_min
        if epsilon is None:
            partials, decisions = suppress_small_cells(partials, k, catalog.fields)
            return partials, decisions, None
        declared_groups_only(partials, catalog)
        if partials[0].kind == "glm_round":
            # A GLM's first round: the whole fit's ε (every round it may take) now.
            model = job.request.query_spec.model
            assert model is not None
            noised, report = glm_noise.noised(
                partials[0], _glm_plan(model, catalog, epsilon), self._noise)
            partials = [noised]
        else:
            partials, report = add_noise(partials, catalog.fields, epsilon, self._noise,
                                         partitioned=job.request.kind == "query")
        partials, decisions = gate_noised(partials, report, k, self._policy.delta)
        return partials, decisions, report

    async def _linear(self, catalog: Catalog, partials: list[Partial],
                      linear: list[LinearCohort]) -> tuple[tuple[str, frozenset[str], str], ...]:
        """The released linear statistics' cohorts, as fingerprints: a withheld partial or
        cell releases nothing, and each (quantity, cohort) counts once."""
        shown = {p.key: p for p in partials if not is_withheld(p)}
        ids = catalog.columns().ids(catalog.subject_key)
        n_cells: dict[tuple[str, GroupKey], int] = {}
        for lc in linear:
            if lc.cell is not None:
                key = (lc.output, lc.group)
                n_cells[key] = n_cells.get(key, 0) + 1
        out: dict[tuple[str, str], tuple[str, frozenset[str], str]] = {}
        seen: dict[bytes, tuple[frozenset[str], str]] = {}
        for lc in linear:
            p = shown.get((lc.output, lc.group))
            if p is None:
                continue
            if lc.cell is not None and not cell_shown(p, lc, n_cells.get(p.key, 0)):
                continue
            if lc.positions.size == 0:
                continue
            # An aggregate's quantities (and often several aggregates) share one cohort:
            # its members are built and fingerprinted once.
            same = lc.positions.tobytes()
            if same not in seen:
                seen[same] = await self._fingerprints.of(
                    catalog, frozenset(ids[lc.positions].tolist()))
            fps, digest = seen[same]
            out.setdefault((lc.quantity, digest), (lc.quantity, fps, digest))
        return tuple(out.values())

    def _from_release(self, release: Release) -> SiteOutcome:
        if release.partials is None:
            # A refunded release is not given out again for free (store/releases.refund).
            return SiteOutcome(self.name, "failed", "this site released its share of the job "
                               "before, and has since dropped it (job retention, or its "
                               "charge was refunded because it was never sent)")
        doc, arrays = codec.unpack(release.partials or b"")
        partials = partial_docs.partials_from_doc(doc["partials"], arrays)
        return self._outcome(release.decision, partials, int(doc["n"]), release.epsilon,
                             doc.get("mechanism"), release.partials, doc.get("delta"))

    def _outcome(self, decision: str, partials: list[Partial], n: int, epsilon: float | None,
                 mechanism: str | None, packed: bytes | None,
                 delta: float | None = None) -> SiteOutcome:
        if decision == "suppressed":
            return SiteOutcome(self.name, "suppressed",
                               f"every output was withheld (k_min = {self._policy.k_min})",
                               partials=lean(partials, packed), packed=packed)
        return SiteOutcome(self.name, "done", "", n=n, partials=lean(partials, packed),
                           epsilon=epsilon, delta=delta, mechanism=mechanism, packed=packed)


def _model_privacy(job: VerifiedJob, catalog: Catalog, epsilon: float | None) -> None:
    """Under noise a model query needs its own mechanism (privacy/glm_noise.py), never the
    aggregates' noise: QueryError, naming why, for a model that has none."""
    req = job.request
    if epsilon is not None and req.kind == "query" and req.query_spec.model is not None:
        _glm_plan(req.query_spec.model, catalog, epsilon)


def _glm_plan(model: AggSpec, catalog: Catalog, epsilon: float) -> glm_noise.GlmNoisePlan:
    return glm_noise.plan(model, catalog.fields, epsilon, rounds=control_of(model).max_rounds)


def _disclosed(partials: list[Partial], cohort: frozenset[str] | None,
               groups: dict[GroupKey, frozenset[str]]
               ) -> tuple[list[frozenset[str]], frozenset[str] | None]:
    """The cohorts a release discloses, and the cohort it counts in the manifest.

    `groups`: a grouped query's subjects per group. Each released group's cell is a cohort
    the researcher learns statistics of, and so is their union (the statistics add up), so
    those are what the overlap guard checks and the manifest counts, not the filter's
    cohort: "everyone" minus "everyone with PD or GPi" is the withheld group. Unions of
    some of the released groups are cohorts too: they are compared with unions of some of
    an earlier query's (privacy/overlap.check_union_overlap). Ungrouped, `cohort` alone."""
    if not groups or cohort is None:
        return [], cohort
    shown = {p.group for p in partials if not is_withheld(p)}
    cells = [groups[g] for g in sorted(shown) if g in groups]
    union: frozenset[str] = frozenset().union(*cells)
    if len(cells) > 1:
        cells.append(union)
    return cells, union


def _decision(suppressed: bool, decisions: list[Decision]) -> str:
    if suppressed:
        return "suppressed"
    if any(d.action != "released" for d in decisions):
        return "partially_suppressed"
    return "released"


def _released_n(partials: list[Partial], cohort: frozenset[str] | None, suppressed: bool,
                noised: bool) -> int:
    """The contribution reported in the manifest: never a number the site withheld.

    Without noise it is the cohort size (≥ k_min, or everything was suppressed); with noise
    the exact size would undo the noise, so it is the largest noised count released.
    """
    if suppressed:
        return 0
    if not noised and cohort is not None:
        return len(cohort)
    counts = [p.n for p in partials if p.suppressed_reason is None]
    return max(0, int(round(max(counts)))) if counts else 0
