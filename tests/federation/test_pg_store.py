"""Real daemons on the PostgreSQL store (`[store] url`, a real server from
tests/store_pg/fixtures.py): an entry answers a federated query with its budget charged
in PostgreSQL and its audit chain verifying, and two replicas of one site (one node name
and certificate, two ports, two state directories) sharing one database never overspend
its budget together."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import asyncpg

from stimctl.client import AsyncClient
from stimnet.errors import StimnetError
from stimnetd.config import load_config
from stimnetd.daemon import Daemon
from stimnetd.store.pg import PgStore
from stimnetd.testing import CertFactory, free_port, write_node_config
from tests.federation.test_federated_queries import _tiny_catalog
from tests.helpers import client_config

QUERY = "SELECT count(*), avg(age) FROM tiny"
PRIVACY = {"dp": "required", "budget_epsilon": 5.0, "max_epsilon_per_query": 1.0,
           "catalog_budget_epsilon": 1e6}


@asynccontextmanager
async def _daemons(tmp: Path, pki: CertFactory, sites: list[tuple[str, str | None]]
                   ) -> AsyncIterator[list[Daemon]]:
    """One daemon per (node name, store url or None for SQLite); a name given twice is
    two replicas of one site (its certificate issued once). Static peers: every other
    node name's first daemon."""
    ports = [free_port() for _ in sites]
    certs = {name: pki.issue(name, "node") for name in dict.fromkeys(n for n, _ in sites)}
    first = {name: ports[[n for n, _ in sites].index(name)] for name in certs}
    async with AsyncExitStack() as stack:
        daemons = []
        for i, (name, url) in enumerate(sites):
            site_dir = tmp / f"{name}-{i}"
            cat = _tiny_catalog(tmp / f"data-{name}", [float(30 + a % 40) for a in range(200)])
            path = write_node_config(
                site_dir, certs[name], name, port=ports[i], catalogs=[cat], crl=pki.crl_path,
                gossip={"enabled": False}, privacy=PRIVACY,
                federation={"peers": [f"127.0.0.1:{p}" for n, p in first.items() if n != name],
                            "subjob_timeout_s": 10.0},
                **({"store": {"url": url}} if url else {}))
            d = Daemon(load_config(path))
            await d.start()
            stack.push_async_callback(d.shutdown)
            daemons.append(d)
        yield daemons


async def _charged(url: str, researcher: str = "alice") -> tuple[int, float]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow("SELECT count(*), coalesce(sum(epsilon), 0) FROM ledger"
                                  " WHERE researcher = $1 AND refunded_at IS NULL", researcher)
    finally:
        await conn.close()
    return int(row[0]), float(row[1])


async def test_an_entry_on_postgresql_answers_charges_there_and_its_chain_verifies(
        tmp_path: Path, pki: CertFactory, pg_url: str) -> None:
    """A federated DP query through an entry on the PostgreSQL store is answered by both
    sites; the entry's ε is charged in PostgreSQL, its audit chain verifies, and the
    replica's state directory records the database's identity."""
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    async with _daemons(tmp_path, pki, [("pgd-a", pg_url), ("pgd-b", None)]) as (entry, _):
        assert isinstance(entry.store, PgStore)
        address = f"127.0.0.1:{entry.port}"
        async with AsyncClient(client_config(alice, address, 20.0)) as c, \
                AsyncClient(client_config(ops, address, 20.0)) as admin:
            answer = await c.query(QUERY, federated=True, epsilon=1.0)
            assert sorted(m["site"] for m in answer.manifest if m["state"] == "done") == [
                "pgd-a", "pgd-b"]
            assert await _charged(pg_url) == (1, 1.0)
            verdict = await admin.audit_verify()
            assert verdict.ok and verdict.entries >= 3  # start, the release, the RPCs
        identity = (entry.config.node.state_dir / "store-identity").read_text().strip()
        assert identity == await entry.store.first_hash()


async def test_two_replicas_sharing_postgresql_never_overspend_together(
        tmp_path: Path, pki: CertFactory, pg_url: str) -> None:
    """20 concurrent ε = 1 queries, 10 at each of two replicas of one site, against a
    budget of 5: exactly 5 are answered, 5 charged in the one ledger, and the one audit
    chain both replicas appended to verifies."""
    alice, ops = pki.issue("alice", "researcher"), pki.issue("ops", "admin")
    async with _daemons(tmp_path, pki, [("pgd-r", pg_url), ("pgd-r", pg_url)]) as replicas:
        addresses = [f"127.0.0.1:{d.port}" for d in replicas]
        async with AsyncClient(client_config(alice, addresses[0], 30.0)) as c0, \
                AsyncClient(client_config(alice, addresses[1], 30.0)) as c1:

            async def ask(c: AsyncClient) -> bool:
                try:
                    await c.query(QUERY, epsilon=1.0)
                except StimnetError as exc:
                    assert "budget" in str(exc), exc
                    return False
                return True

            answered = await asyncio.gather(*(ask(c) for _ in range(10) for c in (c0, c1)))
        assert sum(answered) == 5
        assert await _charged(pg_url) == (5, 5.0)
        async with AsyncClient(client_config(ops, addresses[1], 20.0)) as admin:
            assert (await admin.audit_verify()).ok
        rows = await replicas[0].store.audit_rows()
        charged = [json.loads(r.detail_json) for r in rows
                   if r.action == "release" and r.decision != "refused"]
        assert sum(d["epsilon"] or 0 for d in charged) == 5.0  # the one chain has each charge
