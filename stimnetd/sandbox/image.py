"""Checks that the job sandbox image is present and is the version this daemon expects."""

from __future__ import annotations

from typing import Any

import docker.errors

from stimnet.errors import Unavailable

VERSION_LABEL = "org.stimnet.sandbox.version"
BUILD_HINT = (
    "run sandbox/build-offline.sh (or build sandbox/Dockerfile where a registry is reachable)"
)


class SandboxImageError(Unavailable):
    """The sandbox image is missing or is not the expected version; scripts cannot run."""


def check_image(client: Any, tag: str, expected_version: str) -> str:
    """Return the image id of `tag`, or raise SandboxImageError saying how to fix it.

    Blocking (docker-py); call it through ``asyncio.to_thread`` from async code.
    A version mismatch is an error, not a warning: the in-image runtime writes the result
    format this daemon parses, and an old image would fail every job in a confusing way.
    """
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        raise SandboxImageError(f"sandbox image {tag} not found; {BUILD_HINT}") from None
    labels = (image.attrs.get("Config") or {}).get("Labels") or {}
    found = labels.get(VERSION_LABEL)
    if found is None:
        raise SandboxImageError(
            f"image {tag} has no {VERSION_LABEL} label, so it is not a StimNet sandbox image; "
            f"{BUILD_HINT}"
        )
    if found != expected_version:
        raise SandboxImageError(
            f"sandbox image {tag} is version {found}, this daemon expects {expected_version}; "
            f"{BUILD_HINT}"
        )
    return str(image.id)
