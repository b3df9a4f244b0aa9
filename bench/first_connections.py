"""N researchers' first calls at once, from one address, to one node (issue 26 item 8).

Each of N fresh clients (its own channel, so its own TLS handshake) calls GetInfo at the
same moment against a real `stimnetd` process with the default TLS front limits (32
handshakes at once per address, 256 in all, `handshake_wait_s` 10, at most 1,024 being
told the limit at once). Prints, per N, how many connected, how many were told the
handshake limit (`HandshakeLimited`), and any other error by message, which must never be
a certificate one; and how many connections the node turned away (its `tls connection
refused` log lines, by reason). Before the TLS front queued excess handshakes, 200 at once
gave 34 connected and 166 "the node refused our certificate".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys

from _common import workdir  # type: ignore[import-not-found]

from stimctl.client import AsyncClient, HandshakeLimited
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config


async def first_calls(address: str, certs, n: int) -> collections.Counter[str]:  # type: ignore[no-untyped-def]
    async def one() -> str:
        try:
            async with AsyncClient(client_config(certs, address, timeout_s=30)) as c:
                await c.info()
                return "connected"
        except HandshakeLimited:
            return "told the handshake limit"
        except Exception as exc:  # noqa: BLE001 - the point is to count every outcome
            return f"{type(exc).__name__}: {exc}"

    return collections.Counter(await asyncio.gather(*[one() for _ in range(n)]))


def turned_away(log: str) -> collections.Counter[str]:
    reasons: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        if '"tls connection refused"' in line:
            reasons[json.loads(line)["reason"]] += 1
    return reasons


async def main(counts: list[int]) -> None:
    tmp = workdir()
    pki = CertFactory(tmp / "pki")
    alice = pki.issue("alice", "researcher")
    for i, n in enumerate(counts):
        node = pki.issue(f"bench-conn-{i}", "node")
        port = free_port()
        daemon = DaemonProcess(write_node_config(
            tmp / f"node-{i}", node, f"bench-conn-{i}", port=port, crl=pki.crl_path,
            gossip={"enabled": False},
            # Every turned-away connection logged (by default 20 a minute per source are).
            tls={"refusals_audited_per_minute": 100_000}))
        address = f"127.0.0.1:{port}"
        try:
            await daemon.wait_healthy(alice, address)
            outcomes = await first_calls(address, alice, n)
        finally:
            daemon.stop()
        print(f"N={n}: " + ", ".join(f"{v} {k}" for k, v in outcomes.most_common()))
        for reason, v in turned_away(daemon.log()).most_common():
            print(f"  node turned away {v}: {reason}")
        sys.stdout.flush()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[50, 200, 500])
    asyncio.run(main(parser.parse_args().counts))
