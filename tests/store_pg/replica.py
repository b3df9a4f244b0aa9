"""One stand-in `stimnetd` replica for the two-replica tests: a separate process with its
own connection pool to the shared PostgreSQL store, doing one thing and printing what it
got as one JSON line.

    python -m tests.store_pg.replica URL charge NAME N EPSILON BUDGET
        N concurrent releases of EPSILON each against BUDGET; prints which were charged.
    python -m tests.store_pg.replica URL claim NAME
        claims queued jobs with 4 concurrent claimers until none is left; prints their ids.
    python -m tests.store_pg.replica URL hold NAME LEASE_S
        claims one job, prints its id, then sleeps (the test kills it mid-job).
"""

from __future__ import annotations

import asyncio
import json
import sys

from stimnet.errors import StimnetError
from stimnetd.store.pg import PgStore
from tests.store.contract import release, rules


async def charge(store: PgStore, name: str, n: int, eps: float, budget: float) -> dict:
    rule = rules(budget=budget)
    start = asyncio.Event()

    async def one(i: int) -> str | None:
        await start.wait()
        job = f"{name}-{i}"
        try:
            await store.release(release(job, eps), decide=rule, audit_actor=("alice", "researcher"))
        except StimnetError:
            return None
        return job

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await asyncio.sleep(0.05)
    start.set()
    return {"charged": [j for j in await asyncio.gather(*tasks) if j]}


async def claim(store: PgStore, name: str) -> dict:
    async def claimer() -> list[str]:
        got = []
        while (job := await store.claim_queued(name, 30.0)) is not None:
            got.append(job.id)
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(claimer() for _ in range(4)))
    return {"claimed": [j for r in results for j in r]}


async def main(url: str, mode: str, name: str, *args: str) -> None:
    store = PgStore(url, pool_size=12)
    await store.open()
    try:
        if mode in ("charge", "claim"):
            # Both replicas are connected before either starts: the test releases them
            # together, so their work overlaps.
            print(json.dumps({"ready": True}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        if mode == "charge":
            out = await charge(store, name, int(args[0]), float(args[1]), float(args[2]))
        elif mode == "claim":
            out = await claim(store, name)
        else:
            job = await store.claim_queued(name, float(args[0]))
            print(json.dumps({"held": job.id if job else None}), flush=True)
            await asyncio.sleep(3600)
            return
        print(json.dumps(out), flush=True)
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
