"""The job container's seccomp profile: Docker's default, narrowed.

`docker-seccomp-default.json` is moby's default profile as of Docker 20.10.24
(github.com/moby/moby profiles/seccomp/default.json, Apache-2.0), kept verbatim so the
narrowing below is reviewable against it. Giving Docker a profile replaces its default,
so ours starts from the same list and takes away what a researcher's script never needs:

- ``io_uring_setup``/``_enter``/``_register``: a large, often-exploited kernel surface, and
  asynchronous I/O that sidesteps the syscall-level checks below;
- ``memfd_create``: an executable file in memory, which is how code runs despite the
  ``noexec`` mounts;
- ``socket`` outside AF_UNIX, AF_INET, AF_INET6 and route netlink: the container has no
  network, and AF_VSOCK reaches the host's hypervisor services, other netlink protocols
  the kernel's (audit, netfilter, uevents), AF_PACKET and the rest nothing a job needs.
  AF_INET/6 stay so a lookup fails as "no network" (getaddrinfo's gaierror) rather than
  as an unexplained error; NETLINK_ROUTE because glibc lists interfaces through it.

Refused calls fail with EPERM (the profile's default action).
"""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = Path(__file__).with_name("docker-seccomp-default.json")
REFUSED = frozenset({"io_uring_setup", "io_uring_enter", "io_uring_register", "memfd_create",
                     "socket"})
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
NETLINK_ROUTE = 0


@functools.cache
def profile_json() -> str:
    """The profile as Docker's `seccomp=` security option takes it (the JSON text)."""
    return json.dumps(profile(), separators=(",", ":"))


def profile() -> dict[str, Any]:
    doc = json.loads(DEFAULT_PROFILE.read_text())
    for rule in doc["syscalls"]:
        rule["names"] = [n for n in rule["names"] if n not in REFUSED]
    doc["syscalls"] = [r for r in doc["syscalls"] if r["names"]]
    # One rule per family: rules for the same call are alternatives (any match allows).
    doc["syscalls"] += [{"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                         "args": [{"index": 0, "value": int(family), "op": "SCMP_CMP_EQ"}]}
                        for family in SOCKET_FAMILIES]
    doc["syscalls"].append({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [
        {"index": 0, "value": int(socket.AF_NETLINK), "op": "SCMP_CMP_EQ"},
        {"index": 2, "value": NETLINK_ROUTE, "op": "SCMP_CMP_EQ"}]})
    return doc
