"""What the Kubernetes API is asked to create for one script job: pure functions.

The same hardening as `container.container_spec`, in Kubernetes' vocabulary, so it can
be read (and is unit-tested field by field) in one place:

- a NetworkPolicy selecting the job's pod with both policy types and no rules, i.e. no
  ingress and no egress at all (it is created before the Job, so the pod never exists
  without it; it needs a CNI that enforces NetworkPolicy, which the README says);
- the pod: no service account token, no service links, host namespaces off,
  runAsNonRoot as the image's `nobody`, seccomp RuntimeDefault, restartPolicy Never and
  backoffLimit 0 (a job runs once), activeDeadlineSeconds just above the wall-clock limit;
- the container: read-only root filesystem, all capabilities dropped, no privilege
  escalation, CPU/memory/ephemeral-storage limits equal to requests;
- mounts: the catalog's volume read-only, the job's script and manifest from a ConfigMap
  read-only, /out and /tmp memory-backed emptyDirs with size limits.

Kubernetes has no per-pod pids limit in the pod spec (the kubelet's podPidsLimit is a
node setting), and no RLIMIT_FSIZE; the wrapper (`kubewrap.py`) sets RLIMIT_FSIZE and
RLIMIT_CORE itself before the script starts, and without CAP_SYS_RESOURCE the script
cannot raise them again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from stimnetd.sandbox.container import ENTRYPOINT, _environment
from stimnetd.sandbox.limits import SandboxLimits
from stimnetd.sandbox.workspace import SANDBOX_UID

LABEL_MANAGED = "stimnet.org/managed"
LABEL_NODE = "stimnet.org/node"
LABEL_POD = "stimnet.org/pod"
# The store's installation id: two installations with the same node name in one namespace
# (a test and a production site, a re-created site) never reap each other's objects.
LABEL_INSTALLATION = "stimnet.org/installation"
ANNOTATION_JOB = "stimnet.org/job"
# Kubernetes names are DNS-1123 labels; label values are at most 63 characters.
_LABEL_VALUE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?\Z")
# Past the daemon's own deadline, so the daemon's kill (and its reason) comes first; the
# API server's deadline is the backstop when the daemon is gone.
DEADLINE_GRACE_S = 30
# A finished Job the daemon failed to delete (it crashed) is removed by the cluster.
TTL_AFTER_FINISHED_S = 3600


@dataclass(frozen=True)
class KubeTarget:
    """Where and with what a site's jobs run on its cluster.

    `data_claim`: the PersistentVolumeClaim holding the site's catalogs; a catalog whose
    root is ``<data_root>/x/y`` on this host is the claim's ``x/y`` (subPath).
    """

    namespace: str
    image: str
    data_claim: str
    data_root: str


def wrapper_source() -> str:
    """The pod's PID 1: runs the entrypoint, then frames /out onto stdout."""
    return resources.files("stimnetd.sandbox").joinpath("kubewrap.py").read_text("utf-8")


def check_label_value(value: str, what: str) -> str:
    if not _LABEL_VALUE_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} cannot be a Kubernetes label value")
    return value


def labels(node: str, name: str, installation: str = "") -> dict[str, str]:
    """An empty `installation` (a runner not yet told its store's id) labels by node only."""
    out = {LABEL_MANAGED: "true", LABEL_NODE: node, LABEL_POD: name}
    if installation:
        out[LABEL_INSTALLATION] = installation
    return out


def network_policy(name: str, node: str, target: KubeTarget,
                   installation: str = "") -> dict[str, Any]:
    """Deny all ingress and egress for the job's pod (no rules under both types)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": target.namespace,
                     "labels": labels(node, name, installation)},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_POD: name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [],
        },
    }


def job_config_map(name: str, node: str, job_id: str, target: KubeTarget, script: bytes,
                   manifest_json: str, installation: str = "") -> dict[str, Any]:
    """The script (binaryData: it is bytes) and manifest the pod mounts read-only at /job."""
    import base64

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": target.namespace,
                     "labels": labels(node, name, installation),
                     "annotations": {ANNOTATION_JOB: job_id}},
        "immutable": True,
        "binaryData": {"script.py": base64.b64encode(script).decode("ascii")},
        "data": {"manifest.json": manifest_json},
    }


def job(name: str, node: str, job_id: str, target: KubeTarget, limits: SandboxLimits,
        data_subpath: str, *, verbose_errors: bool = False,
        installation: str = "") -> dict[str, Any]:
    """The batch/v1 Job running one script once."""
    lab = labels(node, name, installation)
    deadline = math.ceil(limits.timeout_s) + DEADLINE_GRACE_S
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": target.namespace, "labels": lab,
                     "annotations": {ANNOTATION_JOB: job_id}},
        "spec": {
            "backoffLimit": 0,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "template": {"metadata": {"labels": lab},
                         "spec": _pod_spec(name, target, limits, data_subpath, deadline,
                                           verbose_errors)},
        },
    }


def _pod_spec(name: str, target: KubeTarget, limits: SandboxLimits, data_subpath: str,
              deadline: int, verbose_errors: bool) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "hostname": "stimnet-job",
        "activeDeadlineSeconds": deadline,
        "terminationGracePeriodSeconds": 0,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "fsGroup": SANDBOX_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(target, limits, data_subpath, verbose_errors)],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": target.data_claim,
                                                        "readOnly": True}},
            {"name": "job", "configMap": {"name": name, "defaultMode": 0o444}},
            {"name": "out", "emptyDir": {"medium": "Memory",
                                         "sizeLimit": str(limits.result_bytes)}},
            {"name": "tmp", "emptyDir": {"medium": "Memory",
                                         "sizeLimit": str(limits.tmpfs_bytes)}},
        ],
    }


def _container(target: KubeTarget, limits: SandboxLimits, data_subpath: str,
               verbose_errors: bool) -> dict[str, Any]:
    resources_ = {
        "cpu": f"{max(1, math.ceil(limits.cpus * 1000))}m",
        "memory": str(limits.memory_bytes),
        # The root is read-only and /out, /tmp are memory-backed (counted in memory);
        # this bounds what the container's logs and writable layer may take on the node.
        "ephemeral-storage": str(limits.log_bytes + 16 * 2**20),
    }
    env = {**_environment(limits, None, verbose_errors),
           "STIMNET_FSIZE_BYTES": str(limits.result_bytes),
           "STIMNET_ENTRYPOINT": " ".join(ENTRYPOINT)}
    return {
        "name": "job",
        "image": target.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python3", "-I", "-B", "-c", wrapper_source()],
        "workingDir": "/job",
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "resources": {"limits": dict(resources_), "requests": dict(resources_)},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": data_subpath},
            {"name": "job", "mountPath": "/job", "readOnly": True},
            {"name": "out", "mountPath": "/out", "readOnly": False},
            {"name": "tmp", "mountPath": "/tmp", "readOnly": False},
        ],
        "terminationMessagePolicy": "File",
    }


def selector(node: str, installation: str = "") -> str:
    base = f"{LABEL_MANAGED}=true,{LABEL_NODE}={node}"
    return f"{base},{LABEL_INSTALLATION}={installation}" if installation else base


def has_labels(obj: Mapping[str, Any], want: Mapping[str, str]) -> bool:
    """Whether `obj`'s metadata carries every label in `want` (checked here as well as by
    the API server's selector, so a listing is never trusted to have filtered)."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in want.items())
