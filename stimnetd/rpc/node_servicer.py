"""NodeService: who this node is and what it holds. Translates only; never a data value."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from stimnet.v1 import node_pb2, node_pb2_grpc
from stimnetd.catalog import Catalog, count_label
from stimnetd.rpc import convert
from stimnetd.rpc.guard import current_caller


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(self, node: Any) -> None:
        # `node` is the daemon's NodeState facade: settings, catalogs, membership, status.
        self._node = node
        self._info: tuple[float, node_pb2.NodeInfo] | None = None

    async def GetInfo(self, request: node_pb2.GetInfoRequest, context: Any) -> node_pb2.NodeInfo:
        n = self._node
        caller = current_caller()
        if self._info is None or self._info[0] != n.started_at:
            # The node part is fixed while the node runs; build it once.
            self._info = (n.started_at, node_pb2.NodeInfo(
                name=n.name, version=n.version, k_min=n.k_min, dp_policy=n.dp_policy,
                script_policy=n.script_policy, catalogs=n.catalogs.names(),
                started_at=_ts(n.started_at), budget_epsilon=n.privacy.budget_epsilon,
                catalog_budget_epsilon=n.privacy.catalog_budget_epsilon or 0.0,
                delta_per_query=n.privacy.delta, shared_history=n.privacy.shared_history))
        info = node_pb2.NodeInfo()
        info.CopyFrom(self._info[1])
        info.catalog_epsilon_remaining.update(await n.catalog_remaining())
        info.caller, info.caller_role = caller.name, caller.role
        return info

    async def ListCatalogs(self, request: node_pb2.ListCatalogsRequest,
                           context: Any) -> node_pb2.ListCatalogsResponse:
        out = [self._summary(c) for c in self._node.catalogs]
        if request.federated:
            for member in self._node.remote_members():
                for name, version in member.catalogs:
                    out.append(node_pb2.CatalogSummary(name=name, schema_version=version,
                                                       subjects="", site=member.name))
        return node_pb2.ListCatalogsResponse(catalogs=out)

    def _summary(self, c: Catalog) -> node_pb2.CatalogSummary:
        return node_pb2.CatalogSummary(
            name=c.name, description=c.config.description,
            schema_version=c.config.schema_version,
            subjects=count_label(c.n_subjects, self._node.k_min),
            tables=[t.name for t in c.tables], site=self._node.name)

    async def DescribeCatalog(self, request: node_pb2.DescribeCatalogRequest,
                              context: Any) -> node_pb2.CatalogDescription:
        c = self._node.catalogs.get(request.name)
        k = self._node.k_min
        fields = [node_pb2.FieldDescription(
            name=f.name, table=f.table, type=f.type, unit=f.unit, description=f.description,
            has_bounds=f.bounds is not None,
            lower=f.bounds[0] if f.bounds else 0.0, upper=f.bounds[1] if f.bounds else 0.0,
            levels=list(f.levels or ()), continuous=f.continuous) for f in c.fields.values()]
        images = []
        for name in c.image_fields():
            g = c.geometry(name)
            images.append(node_pb2.ImageDescription(
                field=name, shape=list(g.shape), voxel_size=list(g.voxel_size),
                affine=[v for row in g.affine for v in row], space=g.space))
        return node_pb2.CatalogDescription(
            summary=self._summary(c), subject_key=c.subject_key,
            tables=[node_pb2.TableDescription(name=t.name, rows=count_label(t.rows, k),
                                              columns=list(t.columns)) for t in c.tables],
            fields=fields, images=images, rois=sorted(c.config.rois),
            grids=await self._grids(c, request.federated))

    async def _grids(self, c: Catalog, federated: bool) -> list[node_pb2.SiteGrid]:
        """This site's grid; with `federated`, every peer's too (each under a deadline)."""
        if not federated:
            return [convert.grid_pb(self._node.name, c.grid())]
        return [convert.grid_pb(g.site, g.grid, g.error)
                for g in await self._node.site_grids(c.name)]

    async def ListPeers(self, request: node_pb2.ListPeersRequest,
                        context: Any) -> node_pb2.ListPeersResponse:
        return node_pb2.ListPeersResponse(peers=[
            node_pb2.Peer(name=m.name, address=m.address, incarnation=m.incarnation,
                          status=m.status, last_heard=_ts(m.last_heard),
                          catalogs=[c for c, _ in m.catalogs])
            for m in self._node.members()])

    async def GetStatus(self, request: node_pb2.GetStatusRequest,
                        context: Any) -> node_pb2.NodeStatus:
        s = await self._node.status()
        return node_pb2.NodeStatus(
            name=s["name"], version=s["version"], uptime_s=s["uptime_s"],
            peers_by_status=s["peers_by_status"], jobs_by_state=s["jobs_by_state"],
            queue_depth=s["queue_depth"], epsilon_spent_by_catalog=s["epsilon_spent"])
