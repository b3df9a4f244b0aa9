"""container_spec: the hardening every job container and zygote is created with, field by
field (a pure function; no Docker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stimnetd.sandbox import SandboxLimits, container_spec
from stimnetd.sandbox.workspace import Workspace

LIMITS = SandboxLimits(memory_bytes=256 << 20, pids=32, cpus=1.5, timeout_s=20.0,
                       result_bytes=1 << 20, log_bytes=64 << 10, tmpfs_bytes=16 << 20)
WORKSPACE = Workspace(Path("/state/work/0123abcd"))
DATA = Path("/catalogs/dbs")


def spec(**changes: Any) -> dict[str, Any]:
    return container_spec(image="stimnet-sandbox:0.1.0", limits=LIMITS, node="node-a",
                          job_id="job-1", workspace=WORKSPACE, data=DATA, **changes)


class TestHostConfig:
    def test_no_network(self) -> None:
        """The container has no network at all, and the engine is told so twice."""
        s = spec()
        assert s["host_config"]["network_mode"] == "none"
        assert s["network_disabled"] is True

    def test_root_is_read_only_and_tmp_is_a_small_noexec_tmpfs(self) -> None:
        """The image is read-only; /tmp is the only scratch space, capped and noexec."""
        host = spec()["host_config"]
        assert host["read_only"] is True
        assert host["tmpfs"] == {"/tmp": "rw,noexec,nosuid,nodev,size=16777216"}
        assert (host["shm_size"], host["ipc_mode"]) == (16 << 20, "private")

    def test_no_capabilities_and_no_new_privileges(self) -> None:
        """Every capability is dropped, setuid cannot gain any, and it is not privileged."""
        host = spec()["host_config"]
        assert host["cap_drop"] == ["ALL"]
        assert "cap_add" not in host
        assert host["security_opt"][0] == "no-new-privileges"
        assert host["security_opt"][1].startswith("seccomp={")
        assert host["privileged"] is False

    def test_pids_memory_and_cpu_are_limited(self) -> None:
        """pids, memory (with no extra swap) and CPU come from the limits."""
        host = spec()["host_config"]
        assert host["pids_limit"] == 32
        assert (host["mem_limit"], host["memswap_limit"]) == (256 << 20, 256 << 20)
        assert host["nano_cpus"] == 1_500_000_000
        assert host["oom_score_adj"] == 1000

    def test_file_size_core_dumps_and_open_files_are_capped(self) -> None:
        """RLIMIT_FSIZE is the result cap, no core dumps, at most 1024 open files."""
        ulimits = {u["Name"]: (u["Soft"], u["Hard"]) for u in spec()["host_config"]["ulimits"]}
        assert ulimits == {"core": (0, 0), "fsize": (1 << 20, 1 << 20), "nofile": (1024, 1024)}

    def test_the_catalog_and_job_are_mounted_read_only_and_only_out_is_writable(self) -> None:
        """Exactly three bind mounts: /data and /job read-only, /out read-write."""
        assert spec()["host_config"]["mounts"] == [
            {"Target": "/data", "Source": "/catalogs/dbs", "Type": "bind", "ReadOnly": True},
            {"Target": "/job", "Source": "/state/work/0123abcd/job", "Type": "bind",
             "ReadOnly": True},
            {"Target": "/out", "Source": "/state/work/0123abcd/out", "Type": "bind",
             "ReadOnly": False},
        ]

    def test_a_private_workspace_gives_etc_files_so_the_engine_binds_none(self) -> None:
        """A private workspace's /data is its copy, and /etc's three files are its own,
        read-only: the engine then binds none from its container directory."""
        ws = Workspace(Path("/state/work/0123abcd"), Path("/state/work/0123abcd/data"),
                       own_etc=True)
        mounts = container_spec(image="i", limits=LIMITS, node="node-a", job_id="j",
                                workspace=ws, data=ws.data or DATA)["host_config"]["mounts"]
        assert mounts[0]["Source"] == "/state/work/0123abcd/data"
        assert mounts[3:] == [
            {"Target": f"/etc/{name}", "Source": f"/state/work/0123abcd/etc/{name}",
             "Type": "bind", "ReadOnly": True} for name in ("hosts", "hostname", "resolv.conf")]

    def test_logs_are_capped_by_the_engine(self) -> None:
        """json-file logging with one file of log_bytes, so a flood cannot fill the disk."""
        log_config = spec()["host_config"]["log_config"]
        assert log_config == {"Type": "json-file", "Config": {"max-size": "64k", "max-file": "1"}}
        assert spec()["host_config"]["auto_remove"] is False


class TestContainer:
    def test_runs_the_daemons_entrypoint_as_nobody(self) -> None:
        """The daemon picks image, user, working dir and entrypoint; the script picks none."""
        s = spec()
        assert s["image"] == "stimnet-sandbox:0.1.0"
        assert s["user"] == "65534:65534"
        assert (s["working_dir"], s["hostname"]) == ("/job", "stimnet-job")
        assert (s["entrypoint"], s["command"]) == (
            ["python3", "-I", "-B", "/opt/stimnet/entrypoint.py"], [])

    def test_is_labelled_and_named_for_its_node_and_workspace(self) -> None:
        """Labels let reap_orphans find the node's containers; the name ties one to its workspace."""
        s = spec(installation="0f1e2d3c4b5a6978")
        assert s["labels"] == {"org.stimnet.managed": "true", "org.stimnet.node": "node-a",
                               "org.stimnet.job": "job-1",
                               "org.stimnet.installation": "0f1e2d3c4b5a6978"}
        assert s["name"] == "stimnet-node-a-0123abcd"

    @pytest.mark.parametrize(("changes", "extra"), [
        ({}, {}),
        ({"verbose_errors": True}, {"STIMNET_VERBOSE_ERRORS": "1"}),
        ({"zygote_idle_s": 660.0}, {"STIMNET_ZYGOTE": "1", "STIMNET_ZYGOTE_IDLE_S": "660.0"}),
    ], ids=["job", "verbose", "zygote"])
    def test_environment_is_the_daemons(self, changes: dict[str, Any],
                                        extra: dict[str, str]) -> None:
        """The environment is fixed; BLAS threads follow the CPU quota (rounded up)."""
        assert spec(**changes)["environment"] == {
            "LANG": "C.UTF-8", "HOME": "/tmp", "OPENBLAS_NUM_THREADS": "2",
            "OMP_NUM_THREADS": "2", "MPLCONFIGDIR": "/tmp", **extra}
