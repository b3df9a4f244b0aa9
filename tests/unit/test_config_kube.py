"""[scripts] backend and [scripts.kubernetes]: the Kubernetes job backend's settings."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from stimnetd.config import ConfigError, load_config
from stimnetd.daemon import Daemon
from stimnetd.sandbox.kube import KubeRunner
from stimnetd.testing import CertFactory, write_node_config

KUBE = {"namespace": "stimnet-jobs", "data_claim": "catalogs", "data_root": "/srv/stimnet"}


@pytest.fixture
def config_path(tmp_path: Path, pki: CertFactory) -> Path:
    return write_node_config(tmp_path / "site", pki.issue("node-a", "node"), "node-a", port=7001)


def _with_scripts(path: Path, scripts: dict) -> Path:
    raw = tomllib.loads(path.read_text())
    raw["scripts"] = scripts
    path.write_text(tomli_w.dumps(raw))
    return path


def test_docker_stays_the_default(config_path: Path) -> None:
    """Without a backend key, script jobs run on the local Docker engine."""
    cfg = load_config(config_path)
    assert (cfg.scripts.backend, cfg.scripts.kubernetes) == ("docker", None)


def test_the_kubernetes_backend_builds_a_kube_runner(config_path: Path) -> None:
    """backend = "kubernetes" with its table gives the daemon a KubeRunner (no API call
    is made until the first job)."""
    cfg = load_config(_with_scripts(config_path, {"backend": "kubernetes", "kubernetes": KUBE}))
    assert cfg.scripts.kubernetes is not None
    assert cfg.scripts.kubernetes.namespace == "stimnet-jobs"
    assert cfg.scripts.kubernetes.kubeconfig is None
    assert isinstance(Daemon._sandbox(cfg), KubeRunner)


@pytest.mark.parametrize(("scripts", "message"), [
    ({"backend": "kubernetes"}, r'\[scripts\]: backend = "kubernetes" needs a \[scripts.kubernetes\]'),
    ({"backend": "nomad"}, r"\[scripts\]\.backend: 'nomad' is not one of docker, kubernetes"),
    ({"backend": "kubernetes", "kubernetes": {**KUBE, "namespace": "Stimnet_Jobs"}},
     r"\[scripts.kubernetes\]\.namespace: 'Stimnet_Jobs' is not a Kubernetes name"),
    ({"backend": "kubernetes", "kubernetes": {"namespace": "x", "data_root": "/d"}},
     r"\[scripts.kubernetes\]: missing required key 'data_claim'"),
    ({"backend": "kubernetes", "kubernetes": {**KUBE, "kubeconfig": "/nonexistent/kubeconfig"}},
     r"\[scripts.kubernetes\]\.kubeconfig: file /nonexistent/kubeconfig does not exist"),
    ({"backend": "kubernetes", "kubernetes": {**KUBE, "colour": "blue"}},
     r"\[scripts.kubernetes\]: unknown key 'colour'"),
])
def test_bad_kubernetes_settings_are_refused_in_one_line(config_path: Path, scripts: dict,
                                                         message: str) -> None:
    """Each mistake names the key and the rule."""
    with pytest.raises(ConfigError, match=message) as err:
        load_config(_with_scripts(config_path, scripts))
    assert "\n" not in str(err.value)
