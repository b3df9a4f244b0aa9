"""The job sandbox: run a researcher script in a locked-down container, and check what it
wrote before anything of it leaves the site.

    limits.py     SandboxLimits, SandboxOutcome: values, no I/O
    workspace.py  the host directory a container mounts: create, hand over, measure, remove
    outputs.py    reading what the container wrote, trusting nothing (no Docker)
    result.py     parse_result: the result's values against the catalog's metadata
    declared.py   check_declared: the result against the outputs its job declared
    container.py  container_spec() and one container's watch and verdict
    cgroup.py     whether a container hit its pids limit
    warm.py       WarmPool: pre-started zygotes per catalog
    runner.py     SandboxRunner: run / cancel / prewarm / reap_orphans / shutdown
    image.py      check_image: the sandbox image is there and is the expected version
"""

from stimnetd.sandbox.container import (
    LABEL_JOB,
    LABEL_MANAGED,
    LABEL_NODE,
    ContainerWatch,
    DockerApi,
    container_spec,
)
from stimnetd.sandbox.declared import agg_spec, check_declared
from stimnetd.sandbox.image import SandboxImageError, check_image
from stimnetd.sandbox.limits import SandboxLimits, SandboxOutcome, SandboxStatus
from stimnetd.sandbox.outputs import ResultRefused, read_outputs
from stimnetd.sandbox.result import NAME_RE, ResultRejected, parse_result
from stimnetd.sandbox.runner import SandboxRunner
from stimnetd.sandbox.warm import WARM_PER_CATALOG, WarmPool
from stimnetd.sandbox.workspace import job_manifest

# The sandbox image version this daemon expects (sandbox/VERSION; a test keeps them equal).
SANDBOX_VERSION = "0.1.0"

__all__ = [
    "LABEL_JOB",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "NAME_RE",
    "SANDBOX_VERSION",
    "WARM_PER_CATALOG",
    "ContainerWatch",
    "DockerApi",
    "ResultRefused",
    "ResultRejected",
    "SandboxImageError",
    "SandboxLimits",
    "SandboxOutcome",
    "SandboxRunner",
    "SandboxStatus",
    "WarmPool",
    "agg_spec",
    "check_declared",
    "check_image",
    "container_spec",
    "job_manifest",
    "parse_result",
    "read_outputs",
]
