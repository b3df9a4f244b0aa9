"""Partial federations are loud: the manifest names every member known to hold the catalog
that did not contribute, with the reason; and a restarted peer is asked again, for every
kind of job, as soon as gossip sees it alive."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from stimctl.client import AsyncClient, JobFailed
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.testing import CertFactory, DaemonProcess, free_port, write_node_config
from tests.helpers import client_config, demo_catalog

FAST = {"gossip_interval_s": 0.1, "probe_interval_s": 0.3, "probe_timeout_s": 0.15,
        "suspicion_mult": 2}
IMAGE_QUERY = "SELECT count_map(vta_path) AS cover FROM dbs_outcomes"


def _config(tmp: Path, pki: CertFactory, i: int, ports: list[int]) -> Path:
    name = f"site-{'ab'[i]}"
    cat = demo_catalog(tmp / f"data-{name}", site=name, site_index=i, n_subjects=12, seed=i)
    return write_node_config(tmp / name, pki.issue(name, "node"), name, port=ports[i],
                             catalogs=[cat], crl=pki.crl_path, gossip=FAST,
                             scripts={"policy": "deny"}, node={"k_min": 1},
                             federation={"seeds": [] if i == 0 else [f"127.0.0.1:{ports[0]}"],
                                         "subjob_timeout_s": 10.0})


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def _status(a: Daemon, name: str) -> str:
    m = a.membership.get(name) if a.membership is not None else None
    return m.status if m is not None else "unknown"


async def test_a_site_that_left_is_named_in_the_manifest(tmp_path: Path, pki: CertFactory) -> None:
    ports = [free_port(), free_port()]
    alice = pki.issue("alice", "researcher")
    a = Daemon(load_config(_config(tmp_path, pki, 0, ports)))
    await a.start()
    b = Daemon(load_config(_config(tmp_path, pki, 1, ports)))
    try:
        await b.start()

        async def b_is(status: str) -> bool:
            return _status(a, "site-b") == status
        await _until(lambda: b_is("alive"), 15, "site-b alive at site-a")
        await b.shutdown()  # announces `left`
        await _until(lambda: b_is("left"), 15, "site-b left at site-a")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}")) as c:
            ans = await c.query("SELECT count(*) FROM dbs_outcomes", federated=True)
            with pytest.raises(JobFailed, match=r"min_sites is 2 — site-b: left \(left the "
                                                 r"federation; last heard"):
                await c.query("SELECT count(*) FROM dbs_outcomes", federated=True, min_sites=2)
    finally:
        await b.shutdown()
        await a.shutdown()
    absent = [m for m in ans.manifest if m["site"] == "site-b"]
    assert [(m["state"], m["reason"]) for m in absent] == [("absent", "left")]
    assert [m["site"] for m in ans.missing] == ["site-b"]
    assert ans.rows[0][0] == 12  # site-a's cohort alone
    assert ("partial federation: 1 of 2 sites known to hold 'dbs_outcomes' contributed; not: "
            "site-b (left)") in ans.notes


async def test_a_restarted_peer_answers_image_queries_once_seen_alive(
        tmp_path: Path, pki: CertFactory) -> None:
    """Killed, then restarted: the first image query after gossip sees it alive (one
    probe interval later) reaches it, although the entry's channel to it had been failing
    to connect all the while it was down."""
    ports = [free_port(), free_port()]
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    a = Daemon(load_config(_config(tmp_path, pki, 0, ports)))
    await a.start()
    b_cfg = _config(tmp_path, pki, 1, ports)
    b = DaemonProcess(b_cfg)
    try:
        await b.wait_healthy(ops, f"127.0.0.1:{ports[1]}")

        async def b_is(status: str) -> bool:
            return _status(a, "site-b") == status
        await _until(lambda: b_is("alive"), 15, "site-b alive at site-a")
        async with AsyncClient(client_config(alice, f"127.0.0.1:{ports[0]}", 30)) as c:
            both = await c.query(IMAGE_QUERY, federated=True, min_sites=2)
            b.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(b.proc.wait, 30)
            # While it is down, the entry keeps trying it (queries while it is suspected,
            # gossip's probes), so its channel backs off further and further.
            down_until = time.monotonic() + 20
            seen = set()
            while time.monotonic() < down_until:
                ans = await c.query(IMAGE_QUERY, federated=True, min_sites=1)
                seen |= {(m["site"], m.get("reason")) for m in ans.missing}
                await asyncio.sleep(0.5)
            assert {s for s, _ in seen} == {"site-b"}, seen
            b.kill()
            b = DaemonProcess(b_cfg)
            await b.wait_healthy(ops, f"127.0.0.1:{ports[1]}")
            await _until(lambda: b_is("alive"), 30, "site-b alive again at site-a")
            await asyncio.sleep(FAST["probe_interval_s"])  # one gossip round
            again = await c.query(IMAGE_QUERY, federated=True, min_sites=2)
    finally:
        b.kill()
        await a.shutdown()
    assert [m["state"] for m in again.manifest] == ["done", "done"]
    assert np.nansum(again.map_array("cover", "count")) == np.nansum(
        both.map_array("cover", "count")) > 0
