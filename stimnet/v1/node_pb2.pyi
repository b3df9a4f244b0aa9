import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("name", "version", "caller", "caller_role", "k_min", "dp_policy", "script_policy", "catalogs", "started_at", "budget_epsilon", "catalog_budget_epsilon", "catalog_epsilon_remaining", "delta_per_query", "shared_history")
    class CatalogEpsilonRemainingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    CALLER_ROLE_FIELD_NUMBER: _ClassVar[int]
    K_MIN_FIELD_NUMBER: _ClassVar[int]
    DP_POLICY_FIELD_NUMBER: _ClassVar[int]
    SCRIPT_POLICY_FIELD_NUMBER: _ClassVar[int]
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    CATALOG_BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    CATALOG_EPSILON_REMAINING_FIELD_NUMBER: _ClassVar[int]
    DELTA_PER_QUERY_FIELD_NUMBER: _ClassVar[int]
    SHARED_HISTORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    caller: str
    caller_role: str
    k_min: int
    dp_policy: str
    script_policy: str
    catalogs: _containers.RepeatedScalarFieldContainer[str]
    started_at: _timestamp_pb2.Timestamp
    budget_epsilon: float
    catalog_budget_epsilon: float
    catalog_epsilon_remaining: _containers.ScalarMap[str, float]
    delta_per_query: float
    shared_history: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., caller: _Optional[str] = ..., caller_role: _Optional[str] = ..., k_min: _Optional[int] = ..., dp_policy: _Optional[str] = ..., script_policy: _Optional[str] = ..., catalogs: _Optional[_Iterable[str]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budget_epsilon: _Optional[float] = ..., catalog_budget_epsilon: _Optional[float] = ..., catalog_epsilon_remaining: _Optional[_Mapping[str, float]] = ..., delta_per_query: _Optional[float] = ..., shared_history: _Optional[bool] = ...) -> None: ...

class ListCatalogsRequest(_message.Message):
    __slots__ = ("federated",)
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    federated: bool
    def __init__(self, federated: _Optional[bool] = ...) -> None: ...

class CatalogSummary(_message.Message):
    __slots__ = ("name", "description", "schema_version", "subjects", "tables", "site")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    schema_version: int
    subjects: str
    tables: _containers.RepeatedScalarFieldContainer[str]
    site: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., schema_version: _Optional[int] = ..., subjects: _Optional[str] = ..., tables: _Optional[_Iterable[str]] = ..., site: _Optional[str] = ...) -> None: ...

class ListCatalogsResponse(_message.Message):
    __slots__ = ("catalogs",)
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[CatalogSummary]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[CatalogSummary, _Mapping]]] = ...) -> None: ...

class DescribeCatalogRequest(_message.Message):
    __slots__ = ("name", "federated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    federated: bool
    def __init__(self, name: _Optional[str] = ..., federated: _Optional[bool] = ...) -> None: ...

class SiteGrid(_message.Message):
    __slots__ = ("site", "shape", "affine", "space", "declared", "error")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    site: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    affine: _containers.RepeatedScalarFieldContainer[float]
    space: str
    declared: bool
    error: str
    def __init__(self, site: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., affine: _Optional[_Iterable[float]] = ..., space: _Optional[str] = ..., declared: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class FieldDescription(_message.Message):
    __slots__ = ("name", "table", "type", "unit", "description", "has_bounds", "lower", "upper", "levels", "continuous")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    HAS_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    CONTINUOUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    table: str
    type: str
    unit: str
    description: str
    has_bounds: bool
    lower: float
    upper: float
    levels: _containers.RepeatedScalarFieldContainer[str]
    continuous: bool
    def __init__(self, name: _Optional[str] = ..., table: _Optional[str] = ..., type: _Optional[str] = ..., unit: _Optional[str] = ..., description: _Optional[str] = ..., has_bounds: _Optional[bool] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ..., levels: _Optional[_Iterable[str]] = ..., continuous: _Optional[bool] = ...) -> None: ...

class ImageDescription(_message.Message):
    __slots__ = ("field", "shape", "voxel_size", "affine", "space")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VOXEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    field: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    voxel_size: _containers.RepeatedScalarFieldContainer[float]
    affine: _containers.RepeatedScalarFieldContainer[float]
    space: str
    def __init__(self, field: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., voxel_size: _Optional[_Iterable[float]] = ..., affine: _Optional[_Iterable[float]] = ..., space: _Optional[str] = ...) -> None: ...

class TableDescription(_message.Message):
    __slots__ = ("name", "rows", "columns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: str
    columns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[str] = ..., columns: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogDescription(_message.Message):
    __slots__ = ("summary", "subject_key", "tables", "fields", "images", "rois", "grids")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ROIS_FIELD_NUMBER: _ClassVar[int]
    GRIDS_FIELD_NUMBER: _ClassVar[int]
    summary: CatalogSummary
    subject_key: str
    tables: _containers.RepeatedCompositeFieldContainer[TableDescription]
    fields: _containers.RepeatedCompositeFieldContainer[FieldDescription]
    images: _containers.RepeatedCompositeFieldContainer[ImageDescription]
    rois: _containers.RepeatedScalarFieldContainer[str]
    grids: _containers.RepeatedCompositeFieldContainer[SiteGrid]
    def __init__(self, summary: _Optional[_Union[CatalogSummary, _Mapping]] = ..., subject_key: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableDescription, _Mapping]]] = ..., fields: _Optional[_Iterable[_Union[FieldDescription, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[ImageDescription, _Mapping]]] = ..., rois: _Optional[_Iterable[str]] = ..., grids: _Optional[_Iterable[_Union[SiteGrid, _Mapping]]] = ...) -> None: ...

class ListPeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "address", "incarnation", "status", "last_heard", "catalogs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARD_FIELD_NUMBER: _ClassVar[int]
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    incarnation: int
    status: str
    last_heard: _timestamp_pb2.Timestamp
    catalogs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., status: _Optional[str] = ..., last_heard: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., catalogs: _Optional[_Iterable[str]] = ...) -> None: ...

class ListPeersResponse(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "version", "uptime_s", "peers_by_status", "jobs_by_state", "queue_depth", "epsilon_spent_by_catalog")
    class PeersByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class JobsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class EpsilonSpentByCatalogEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    PEERS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    JOBS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_BY_CATALOG_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    uptime_s: float
    peers_by_status: _containers.ScalarMap[str, int]
    jobs_by_state: _containers.ScalarMap[str, int]
    queue_depth: int
    epsilon_spent_by_catalog: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., peers_by_status: _Optional[_Mapping[str, int]] = ..., jobs_by_state: _Optional[_Mapping[str, int]] = ..., queue_depth: _Optional[int] = ..., epsilon_spent_by_catalog: _Optional[_Mapping[str, float]] = ...) -> None: ...
