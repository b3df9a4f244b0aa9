"""Whole SWIM clusters in the virtual-time simulator (stimnetd.gossip.sim): convergence,
failure detection, restarts, partitions, leaving, joining, loss and churn."""

from __future__ import annotations

import asyncio
import math

from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.sim import SimCluster, member_size, run_virtual


def test_eight_nodes_converge_from_one_seed_within_two_log2_n_rounds() -> None:
    """Started together with one seed, 8 nodes all see each other alive in ≤ 2·log2(8) rounds."""

    async def scenario() -> float | None:
        async with SimCluster(8, seed=3) as cluster:
            bound = 2 * math.log2(8) * cluster.config.gossip_interval
            return await cluster.wait_until(cluster.converged, bound)

    assert run_virtual(scenario()) is not None


def _detection_bound(config: GossipConfig, n: int) -> float:
    # Round-robin over a reshuffled list reaches any target within 2(N-1) probes; then a
    # probe interval for direct+indirect, the suspicion timeout, and gossip to everyone.
    return ((2 * (n - 1) + 1) * config.probe_interval + config.suspicion_timeout(n)
            + 2 * math.log2(n) * config.gossip_interval)


def test_killed_node_is_suspected_then_dead_everywhere_within_bound() -> None:
    """Every survivor marks a crashed node dead within the bound, never before suspicion
    ran its course, and never bumps the dead node's incarnation."""

    async def scenario() -> None:
        async with SimCluster(8, seed=5) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            victim = cluster.names[3]
            incarnation = cluster.nodes[victim].local_member().incarnation
            loop = asyncio.get_running_loop()
            events: list[tuple[float, str, str]] = []
            for name in cluster.names:
                if name != victim:
                    cluster.nodes[name].subscribe(
                        lambda c, o=name: events.append((loop.time(), o, c.current.status))
                        if c.current.name == victim else None)
            await cluster.kill(victim)
            killed_at = loop.time()
            bound = _detection_bound(cluster.config, 8)
            took = await cluster.wait_until(
                lambda: cluster.all_see([victim], ("dead",)), bound)
            assert took is not None
            first_suspect = min(t for t, _, s in events if s == "suspect")
            first_dead = min(t for t, _, s in events if s == "dead")
            assert killed_at < first_suspect
            assert first_dead - first_suspect >= cluster.config.suspicion_timeout(7) - 1e-6
            for name in cluster.running:
                assert cluster.nodes[name].get(victim).incarnation == incarnation  # type: ignore[union-attr]

    run_virtual(scenario())


def test_restarted_node_is_alive_everywhere_with_higher_incarnation() -> None:
    """A crashed node restarted from its store is alive on every member at a higher
    incarnation than it had before."""

    async def scenario() -> None:
        async with SimCluster(6, seed=11) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            name = cluster.names[2]
            before = cluster.nodes[name].local_member().incarnation
            await cluster.kill(name)
            await cluster.wait_until(lambda: cluster.all_see([name], ("dead",)), 60)
            cluster.restart(name)
            took = await cluster.wait_until(cluster.converged, 10)
            assert took is not None
            for observer in cluster.running:
                seen = cluster.nodes[observer].get(name)
                assert seen is not None and seen.incarnation > before

    run_virtual(scenario())


def test_partition_is_detected_on_both_sides_and_heals() -> None:
    """Split 2+3, each side marks the other suspect or dead; after healing all converge."""
    config = GossipConfig(reconnect_interval=2.0)

    async def scenario() -> None:
        async with SimCluster(5, config=config, seed=13) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            left, right = cluster.names[:2], cluster.names[2:]
            cluster.network.partition(left, right)
            split = await cluster.wait_until(
                lambda: cluster.all_see(right, ("suspect", "dead"), observers=left)
                and cluster.all_see(left, ("suspect", "dead"), observers=right), 60)
            assert split is not None
            assert cluster.all_see(left, ("alive",), observers=left) is True
            assert cluster.all_see(right, ("alive",), observers=right) is True
            # Heal only once both sides have given up on each other: reconnecting to the
            # dead is then the only way back.
            assert await cluster.wait_until(
                lambda: cluster.all_see(right, ("dead",), observers=left)
                and cluster.all_see(left, ("dead",), observers=right), 60) is not None
            await asyncio.sleep(5)
            cluster.network.heal()
            assert await cluster.wait_until(cluster.converged, 60) is not None

    run_virtual(scenario())


def test_graceful_leave_is_seen_as_left_everywhere() -> None:
    """A node that leaves is marked left (not dead) by every remaining member."""

    async def scenario() -> None:
        async with SimCluster(6, seed=17) as cluster:
            assert await cluster.wait_until(cluster.converged, 5) is not None
            name = cluster.names[4]
            await cluster.leave(name)
            took = await cluster.wait_until(lambda: cluster.all_see([name], ("left",)), 30)
            assert took is not None

    run_virtual(scenario())


def test_nodes_keep_retrying_until_the_seed_comes_up() -> None:
    """Nodes whose only seed is down keep retrying with backoff and join once it is up."""

    async def scenario() -> None:
        cluster = SimCluster(4, seed=19)
        cluster.start(cluster.names[1:])
        await asyncio.sleep(20)
        assert [len(cluster.nodes[n].members()) for n in cluster.names[1:]] == [1, 1, 1]
        cluster.start(cluster.names[:1])
        try:
            limit = cluster.config.join_backoff_max + 5
            assert await cluster.wait_until(cluster.converged, limit) is not None
        finally:
            await cluster.stop()

    run_virtual(scenario())


def test_lossy_network_converges_without_false_deaths() -> None:
    """With 10% of messages lost, members still converge and nobody alive ends up dead."""

    async def scenario() -> None:
        async with SimCluster(8, seed=23, drop_rate=0.1) as cluster:
            assert await cluster.wait_until(cluster.converged, 10) is not None
            await asyncio.sleep(30)
            assert cluster.all_see(cluster.running, ("alive", "suspect")) is True

    run_virtual(scenario())


def test_probe_messages_stay_bounded_during_churn() -> None:
    """While 32 nodes join and one dies, no probe-path message exceeds max_piggyback + 1
    entries, so per-member probe traffic does not grow with N."""

    async def scenario() -> None:
        async with SimCluster(32, seed=29) as cluster:
            await cluster.wait_until(cluster.converged, 10)
            await cluster.kill(cluster.names[7])
            await asyncio.sleep(15)
            biggest_entry = max(member_size(x.local_member()) for x in cluster.nodes.values())
            bound = (cluster.config.max_piggyback + 1) * (biggest_entry + 8)
            assert 0 < cluster.network.traffic.largest["probe"] <= bound

    run_virtual(scenario())


def test_only_a_node_raises_its_own_incarnation() -> None:
    """Across a run with a crash, every member's incarnation as seen by others is one the
    member itself announced."""

    async def scenario() -> None:
        async with SimCluster(6, seed=31) as cluster:
            announced: dict[str, set[int]] = {n: set() for n in cluster.names}
            for _ in range(200):
                for n in cluster.running:
                    announced[n].add(cluster.nodes[n].local_member().incarnation)
                await asyncio.sleep(0.05)
                if _ == 10:
                    await cluster.kill(cluster.names[1])
            for observer in cluster.running:
                for x in cluster.nodes[observer].members():
                    assert x.incarnation in announced[x.name]

    run_virtual(scenario())
