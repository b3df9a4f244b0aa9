"""The Kubernetes objects a script job is run with: the hardening, field by field, and the
output frame's decoding rules."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from stimnetd.sandbox import SandboxLimits, kubespec
from stimnetd.sandbox.kubeout import decode_frame, split_frame
from stimnetd.sandbox.outputs import ResultRefused
from stimnetd.sandbox.workspace import SANDBOX_UID

LIM = SandboxLimits(memory_bytes=256 * 2**20, cpus=1.5, timeout_s=60.5,
                    result_bytes=2**20, log_bytes=64 * 1024, tmpfs_bytes=16 * 2**20)
TARGET = kubespec.KubeTarget(namespace="jobs", image="stimnet-sandbox:0.1.0",
                             data_claim="catalogs", data_root="/srv/stimnet")


@pytest.fixture
def job() -> dict:
    return kubespec.job("stimnet-abc", "site-a", "job-1", TARGET, LIM, "cat1")


def test_the_job_runs_once_with_a_deadline_and_is_collected(job: dict) -> None:
    """backoffLimit 0, one completion, the API's deadline past the daemon's, a TTL."""
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert (spec["completions"], spec["parallelism"]) == (1, 1)
    assert spec["activeDeadlineSeconds"] == 61 + kubespec.DEADLINE_GRACE_S
    assert spec["ttlSecondsAfterFinished"] == kubespec.TTL_AFTER_FINISHED_S
    assert job["metadata"]["annotations"] == {kubespec.ANNOTATION_JOB: "job-1"}


def test_the_pod_has_no_token_no_host_namespaces_and_never_restarts(job: dict) -> None:
    """No service account token or links, host network/PID/IPC off, restartPolicy Never."""
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert (pod["hostNetwork"], pod["hostPID"], pod["hostIPC"]) == (False, False, False)
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": SANDBOX_UID, "runAsGroup": SANDBOX_UID,
        "fsGroup": SANDBOX_UID, "seccompProfile": {"type": "RuntimeDefault"}}
    assert len(pod["containers"]) == 1 and "initContainers" not in pod


def test_the_container_is_read_only_without_capabilities_as_non_root(job: dict) -> None:
    """Read-only root, capabilities drop ALL, no escalation, non-root, seccomp RuntimeDefault."""
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": SANDBOX_UID, "runAsGroup": SANDBOX_UID,
        "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
        "privileged": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert c["image"] == "stimnet-sandbox:0.1.0"
    assert c["command"][:4] == ["python3", "-I", "-B", "-c"]
    assert c["command"][4] == kubespec.wrapper_source()


def test_resources_are_limited_and_requested_alike(job: dict) -> None:
    """CPU, memory and ephemeral storage limits equal the requests (Guaranteed QoS)."""
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"] == c["resources"]["requests"]
    assert c["resources"]["limits"]["cpu"] == "1500m"
    assert c["resources"]["limits"]["memory"] == str(256 * 2**20)
    assert int(c["resources"]["limits"]["ephemeral-storage"]) > LIM.log_bytes


def test_the_data_is_read_only_and_out_and_tmp_are_capped(job: dict) -> None:
    """The claim mounted read-only (in the volume and the mount), /job read-only from the
    ConfigMap, /out and /tmp memory-backed with the result and tmpfs limits."""
    pod = job["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True,
                              "subPath": "cat1"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "catalogs", "readOnly": True}
    assert mounts["job"]["readOnly"] is True and mounts["job"]["mountPath"] == "/job"
    assert volumes["job"]["configMap"] == {"name": "stimnet-abc", "defaultMode": 0o444}
    assert volumes["out"]["emptyDir"] == {"medium": "Memory", "sizeLimit": str(2**20)}
    assert volumes["tmp"]["emptyDir"] == {"medium": "Memory", "sizeLimit": str(16 * 2**20)}
    assert set(mounts) == set(volumes) == {"data", "job", "out", "tmp"}


def test_the_wrapper_caps_file_size_and_runs_the_image_entrypoint(job: dict) -> None:
    """RLIMIT_FSIZE is the result limit; the entrypoint is the image's."""
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["STIMNET_FSIZE_BYTES"] == str(2**20)
    assert env["STIMNET_ENTRYPOINT"] == "python3 -I -B /opt/stimnet/entrypoint.py"
    assert "STIMNET_VERBOSE_ERRORS" not in env and "STIMNET_ZYGOTE" not in env


def test_the_network_policy_denies_all_traffic_of_the_pod_it_selects(job: dict) -> None:
    """Both policy types, no rules: nothing in, nothing out; it selects this pod only."""
    policy = kubespec.network_policy("stimnet-abc", "site-a", TARGET)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert (policy["spec"]["ingress"], policy["spec"]["egress"]) == ([], [])
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected == {kubespec.LABEL_POD: "stimnet-abc"}
    assert job["spec"]["template"]["metadata"]["labels"][kubespec.LABEL_POD] == "stimnet-abc"


def test_the_config_map_holds_the_script_bytes_and_is_immutable() -> None:
    """The script travels as binaryData (bytes, not text); the map cannot be edited."""
    cm = kubespec.job_config_map("stimnet-abc", "site-a", "job-1", TARGET, b"\xff\x00print(1)",
                                 "{}")
    assert cm["immutable"] is True
    assert base64.b64decode(cm["binaryData"]["script.py"]) == b"\xff\x00print(1)"


def _frame(files: dict) -> str:
    return json.dumps({k: (None if v is None else base64.b64encode(v).decode())
                       for k, v in files.items()})


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_a_frame_decodes_to_the_result_and_its_arrays() -> None:
    """result.json and the .npy it names come back as the document and the array."""
    doc = {"aggregates": [{"name": "m", "stats": {"sum": {"npy": "m.npy"}}}]}
    body = _frame({"result.json": json.dumps(doc).encode(),
                   "m.npy": _npy(np.arange(3.0))})
    got, arrays = decode_frame(body, 2**20)
    assert got == doc
    np.testing.assert_array_equal(arrays["m.npy"], np.arange(3.0))


@pytest.mark.parametrize(("files", "reason"), [
    ({"result.json": None}, "something other than a regular file"),
    ({"../etc/x.npy": b"x", "result.json": b"{}"}, "not result.json or a plain *.npy name"),
    ({"notes.txt": b"x"}, "not result.json or a plain *.npy name"),
    ({"result.json": b"x" * 5000}, "output exceeded result limit 4 KiB"),
    ({"a.npy": b"x" * 3000, "result.json": b"x" * 3000}, "output exceeded result limit 4 KiB"),
    ({"result.json": b"[1]"}, "not a JSON object"),
    ({"result.json": b'{"aggregates": [{"stats": {"s": {"npy": "gone.npy"}}}]}'},
     "an array file the result refers to is missing"),
])
def test_a_hostile_frame_is_refused_naming_the_rule(files: dict, reason: str) -> None:
    """Every rule a Docker job's /out is read under holds for a frame; no name is quoted."""
    with pytest.raises(ResultRefused, match=reason.replace("*", r"\*")) as err:
        decode_frame(_frame(files), 4096)
    assert "etc" not in str(err.value) and "notes" not in str(err.value)


@pytest.mark.parametrize("body", ['{"result.json": "@@@"}', '{"result.json"', "[]", None])
def test_a_garbled_or_missing_frame_is_refused(body: str | None) -> None:
    """Truncated JSON, bad base64, a non-object or no frame at all: refused, not raised."""
    with pytest.raises(ResultRefused):
        decode_frame(body, 4096)


def test_the_last_frame_line_is_the_one_read() -> None:
    """A frame the script printed earlier is part of its log; the wrapper's last line wins."""
    log, body = split_frame('hello\nstimnet-out-v1 {"forged": 1}\nmore\nstimnet-out-v1 {"a": 2}')
    assert body == '{"a": 2}'
    assert log == 'hello\nstimnet-out-v1 {"forged": 1}\nmore'
    assert split_frame("no frame here") == ("no frame here", None)
