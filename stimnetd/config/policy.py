"""What the site allows: [privacy] (differential privacy and its budget) and [scripts]
(review, sandbox limits, declared outputs)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stimnetd.config.reader import Reader

DP_POLICIES = ("off", "optional", "required")
SCRIPT_POLICIES = ("auto", "review", "deny")
LOG_POLICIES = ("none", "errors", "full")
DECLARED_OUTPUTS = ("required", "optional")
RESTART_POLICIES = ("interrupt", "requeue")
SCRIPT_BACKENDS = ("docker", "kubernetes")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class KubeSettings:
    """[scripts.kubernetes]: where script jobs run when `backend = "kubernetes"`."""

    namespace: str
    # The PersistentVolumeClaim holding the catalogs; a catalog root under `data_root`
    # on this host is the same relative path on the claim.
    data_claim: str
    data_root: str
    # None: the in-cluster service account (the daemon runs in a pod).
    kubeconfig: str | None = None
    context: str | None = None


@dataclass(frozen=True)
class BlockSplit:
    """How a noised script job's cohort is split into blocks (privacy/blocks.py):
    B = max(1, min(n // subjects_per_block, max_blocks)) for a catalog of n subjects.

    More blocks shrink the noise (its scale is range / (B·ε)) but leave fewer subjects per
    block, so each block's own estimate is noisier; the README weighs the two."""

    subjects_per_block: int = 10
    max_blocks: int = 50

    def blocks(self, n: int) -> int:
        return max(1, min(n // self.subjects_per_block, self.max_blocks))


@dataclass(frozen=True)
class PrivacySettings:
    # A site that says nothing gets the formal guarantee (docs/privacy.md); "optional" and
    # "off" are chosen explicitly, and logged at start-up (config/advice.py).
    dp: str = "required"
    default_epsilon: float = 1.0
    max_epsilon_per_query: float = 5.0
    budget_epsilon: float = 10.0
    overlap_guard: bool = True
    delta: float = 1e-6
    budget_delta: float = 1e-4
    catalog_budget_epsilon: float | None = None
    shared_history: bool = False
    blocks: BlockSplit = BlockSplit()


@dataclass(frozen=True)
class ScriptSettings:
    policy: str = "review"
    log_policy: str = "errors"
    # "required": a script job must declare its outputs (names, functions, fields, edges,
    # GROUP BY) in the signed request, and its result must be exactly that; "optional":
    # undeclared scripts run too (their output names and edges are a channel past k_min).
    declared_outputs: str = "required"
    concurrency: int = 1
    image: str = "stimnet-sandbox"
    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 64
    timeout_s: float = 300.0
    result_mb: int = 8
    on_restart: str = "interrupt"
    # Pre-started containers per catalog (policy auto only); 0 turns them off on small hosts.
    warm_containers: int = 2
    # Script jobs one researcher may have queued, running or awaiting approval here (each
    # keeps its script, up to 1 MiB, in the store until it ends).
    max_pending_per_researcher: int = 16
    backend: str = "docker"
    kubernetes: KubeSettings | None = None
    # A noised (sample-and-aggregate) script share is released at a multiple of this after
    # its start, so its release time does not follow the script's run time (site/blocks.py).
    release_slot_s: float = 30.0


def read_privacy(r: Reader, raw: dict[str, Any]) -> PrivacySettings:
    w = "[privacy]"
    raw = r.table(raw, w, {"dp", "default_epsilon", "max_epsilon_per_query",
                           "budget_epsilon", "overlap_guard", "delta", "budget_delta",
                           "catalog_budget_epsilon", "shared_history",
                           "script_block_subjects", "script_max_blocks"})
    p = PrivacySettings(
        dp=r.get(raw, w, "dp", str, "required", choices=DP_POLICIES),
        default_epsilon=r.get(raw, w, "default_epsilon", float, 1.0),
        max_epsilon_per_query=r.get(raw, w, "max_epsilon_per_query", float, 5.0),
        budget_epsilon=r.get(raw, w, "budget_epsilon", float, 10.0),
        overlap_guard=r.get(raw, w, "overlap_guard", bool, True),
        delta=r.get(raw, w, "delta", float, 1e-6),
        budget_delta=r.get(raw, w, "budget_delta", float, 1e-4),
        catalog_budget_epsilon=r.get(raw, w, "catalog_budget_epsilon", float, None),
        shared_history=r.get(raw, w, "shared_history", bool, False),
        blocks=BlockSplit(r.get(raw, w, "script_block_subjects", int, 10),
                          r.get(raw, w, "script_max_blocks", int, 50)),
    )
    if p.blocks.subjects_per_block < 1 or p.blocks.max_blocks < 1:
        raise r.fail(w, "script_block_subjects and script_max_blocks must be at least 1")
    if p.catalog_budget_epsilon is not None and p.catalog_budget_epsilon <= 0:
        raise r.fail(f"{w}.catalog_budget_epsilon", "must be positive")
    for key in ("default_epsilon", "max_epsilon_per_query", "budget_epsilon"):
        if getattr(p, key) <= 0:
            raise r.fail(f"{w}.{key}", "must be positive")
    if p.default_epsilon > p.max_epsilon_per_query:
        raise r.fail(f"{w}.default_epsilon", "exceeds max_epsilon_per_query")
    for key in ("delta", "budget_delta"):
        if not 0 < getattr(p, key) < 1:
            raise r.fail(f"{w}.{key}", "must be between 0 and 1 (exclusive)")
    if p.delta > p.budget_delta:
        raise r.fail(f"{w}.delta", "exceeds budget_delta")
    return p


def read_scripts(r: Reader, raw: dict[str, Any]) -> ScriptSettings:
    w = "[scripts]"
    raw = r.table(raw, w, {"policy", "log_policy", "concurrency", "image", "memory_mb",
                           "cpus", "pids", "timeout_s", "result_mb", "on_restart",
                           "warm_containers", "declared_outputs",
                           "max_pending_per_researcher", "backend", "kubernetes",
                           "release_slot_s"})
    s = ScriptSettings(
        policy=r.get(raw, w, "policy", str, "review", choices=SCRIPT_POLICIES),
        log_policy=r.get(raw, w, "log_policy", str, "errors", choices=LOG_POLICIES),
        declared_outputs=r.get(raw, w, "declared_outputs", str, "required",
                               choices=DECLARED_OUTPUTS),
        concurrency=r.get(raw, w, "concurrency", int, 1),
        image=r.get(raw, w, "image", str, "stimnet-sandbox"),
        memory_mb=r.get(raw, w, "memory_mb", int, 512),
        cpus=r.get(raw, w, "cpus", float, 1.0),
        pids=r.get(raw, w, "pids", int, 64),
        timeout_s=r.get(raw, w, "timeout_s", float, 300.0),
        result_mb=r.get(raw, w, "result_mb", int, 8),
        on_restart=r.get(raw, w, "on_restart", str, "interrupt", choices=RESTART_POLICIES),
        warm_containers=r.get(raw, w, "warm_containers", int, 2),
        max_pending_per_researcher=r.limit(raw, w, "max_pending_per_researcher", 16),
        backend=r.get(raw, w, "backend", str, "docker", choices=SCRIPT_BACKENDS),
        kubernetes=_read_kube(r, raw["kubernetes"]) if "kubernetes" in raw else None,
        release_slot_s=r.get(raw, w, "release_slot_s", float, 30.0),
    )
    if not 0 <= s.release_slot_s <= 86400:
        raise r.fail(f"{w}.release_slot_s", "must be between 0 (no hold) and 86400 seconds")
    if s.backend == "kubernetes" and s.kubernetes is None:
        raise r.fail(w, 'backend = "kubernetes" needs a [scripts.kubernetes] table '
                        "(namespace, data_claim, data_root)")
    if not 0 <= s.warm_containers <= 16:
        raise r.fail(f"{w}.warm_containers", "must be between 0 and 16")
    for key in ("concurrency", "memory_mb", "pids", "result_mb"):
        if getattr(s, key) < 1:
            raise r.fail(f"{w}.{key}", "must be at least 1")
    if s.cpus <= 0 or s.timeout_s <= 0:
        raise r.fail(w, "cpus and timeout_s must be positive")
    return s


def _read_kube(r: Reader, raw: dict[str, Any]) -> KubeSettings:
    w = "[scripts.kubernetes]"
    raw = r.table(raw, w, {"namespace", "data_claim", "data_root", "kubeconfig", "context"})
    kubeconfig = r.get(raw, w, "kubeconfig", str, None)
    for key in ("namespace", "data_claim"):
        value = r.get(raw, w, key, str)
        if not _DNS_LABEL_RE.fullmatch(value):
            raise r.fail(f"{w}.{key}", f"{value!r} is not a Kubernetes name (lowercase "
                                       "letters, digits and '-', at most 63)")
    return KubeSettings(
        namespace=r.get(raw, w, "namespace", str),
        data_claim=r.get(raw, w, "data_claim", str),
        data_root=str(r.path_of(r.get(raw, w, "data_root", str), f"{w}.data_root",
                                must_exist=False)),
        kubeconfig=str(r.path_of(kubeconfig, f"{w}.kubeconfig")) if kubeconfig else None,
        context=r.get(raw, w, "context", str, None),
    )
