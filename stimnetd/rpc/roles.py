"""Which roles may call which RPC. Deny by default: a method missing here is refused."""

from __future__ import annotations

RESEARCHER = "researcher"
ADMIN = "admin"
NODE = "node"

_ANY = frozenset({RESEARCHER, ADMIN, NODE})
_PEOPLE = frozenset({RESEARCHER, ADMIN})

RPC_ROLES: dict[str, frozenset[str]] = {
    "/stimnet.v1.NodeService/GetInfo": _ANY,
    "/stimnet.v1.NodeService/ListCatalogs": _ANY,
    "/stimnet.v1.NodeService/DescribeCatalog": _ANY,
    "/stimnet.v1.NodeService/ListPeers": _ANY,
    "/stimnet.v1.NodeService/GetStatus": frozenset({ADMIN}),
    # Only researchers submit jobs: a job is signed by the researcher whose budget it spends.
    "/stimnet.v1.JobService/SubmitJob": frozenset({RESEARCHER}),
    "/stimnet.v1.JobService/RunJob": frozenset({RESEARCHER}),
    # Each job on it is checked again as a RunJob call (Guard.subcall).
    "/stimnet.v1.JobService/Session": frozenset({RESEARCHER}),
    "/stimnet.v1.JobService/GetJob": _PEOPLE,
    "/stimnet.v1.JobService/ListJobs": _PEOPLE,
    "/stimnet.v1.JobService/CancelJob": _PEOPLE,
    "/stimnet.v1.JobService/WatchJob": _PEOPLE,
    "/stimnet.v1.JobService/GetResult": frozenset({RESEARCHER}),
    "/stimnet.v1.JobService/ApproveJob": frozenset({ADMIN}),
    "/stimnet.v1.JobService/DenyJob": frozenset({ADMIN}),
    "/stimnet.v1.FederationService/RunSubJob": frozenset({NODE}),
    # Each sub-job on it is checked again as a RunSubJob call (Guard.subcall).
    "/stimnet.v1.FederationService/SubJobs": frozenset({NODE}),
    "/stimnet.v1.FederationService/Ping": frozenset({NODE}),
    "/stimnet.v1.FederationService/PingReq": frozenset({NODE}),
    "/stimnet.v1.FederationService/PushPull": frozenset({NODE}),
    "/stimnet.v1.AdminService/VerifyAudit": frozenset({ADMIN}),
    "/stimnet.v1.AdminService/ExportAudit": frozenset({ADMIN}),
    # Standard services: any federation identity; they reveal no data.
    "/grpc.health.v1.Health/Check": _ANY,
    "/grpc.health.v1.Health/Watch": _ANY,
    "/grpc.health.v1.Health/List": _ANY,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _ANY,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _ANY,
}


def allowed_roles(method: str) -> frozenset[str]:
    return RPC_ROLES.get(method, frozenset())


def admin_scoped(method: str) -> bool:
    """Whether an admin calling `method` must be one of this node's own admins: every
    method open to admins but not to nodes (status, jobs, approvals, audit). An admin
    certificate is valid at every node of the federation; the node's `[node] admins` list
    is what makes it this node's admin."""
    roles = RPC_ROLES.get(method, frozenset())
    return ADMIN in roles and NODE not in roles
