from stimnet.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubJobRequest(_message.Message):
    __slots__ = ("job", "entry_node", "request_id", "round", "beta", "resume")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ENTRY_NODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.SignedJob
    entry_node: str
    request_id: str
    round: int
    beta: _containers.RepeatedScalarFieldContainer[float]
    resume: bool
    def __init__(self, job: _Optional[_Union[_common_pb2.SignedJob, _Mapping]] = ..., entry_node: _Optional[str] = ..., request_id: _Optional[str] = ..., round: _Optional[int] = ..., beta: _Optional[_Iterable[float]] = ..., resume: _Optional[bool] = ...) -> None: ...

class SubJobEvent(_message.Message):
    __slots__ = ("site", "partial", "log_line")
    SITE_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    LOG_LINE_FIELD_NUMBER: _ClassVar[int]
    site: _common_pb2.SiteEvent
    partial: _common_pb2.ResultFrame
    log_line: str
    def __init__(self, site: _Optional[_Union[_common_pb2.SiteEvent, _Mapping]] = ..., partial: _Optional[_Union[_common_pb2.ResultFrame, _Mapping]] = ..., log_line: _Optional[str] = ...) -> None: ...

class SubJobCall(_message.Message):
    __slots__ = ("id", "start", "timeout_s", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: SubJobRequest
    timeout_s: float
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., start: _Optional[_Union[SubJobRequest, _Mapping]] = ..., timeout_s: _Optional[float] = ..., cancel: _Optional[bool] = ...) -> None: ...

class SubJobReply(_message.Message):
    __slots__ = ("id", "event", "status")
    ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: int
    event: SubJobEvent
    status: _common_pb2.CallStatus
    def __init__(self, id: _Optional[int] = ..., event: _Optional[_Union[SubJobEvent, _Mapping]] = ..., status: _Optional[_Union[_common_pb2.CallStatus, _Mapping]] = ...) -> None: ...

class MemberState(_message.Message):
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
    last_heard: float
    catalogs: _containers.RepeatedCompositeFieldContainer[CatalogRef]
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., status: _Optional[str] = ..., last_heard: _Optional[float] = ..., catalogs: _Optional[_Iterable[_Union[CatalogRef, _Mapping]]] = ...) -> None: ...

class CatalogRef(_message.Message):
    __slots__ = ("name", "schema_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    schema_version: int
    def __init__(self, name: _Optional[str] = ..., schema_version: _Optional[int] = ...) -> None: ...

class GossipMessage(_message.Message):
    __slots__ = ("sender", "sender_incarnation", "members")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SENDER_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    sender: str
    sender_incarnation: int
    members: _containers.RepeatedCompositeFieldContainer[MemberState]
    def __init__(self, sender: _Optional[str] = ..., sender_incarnation: _Optional[int] = ..., members: _Optional[_Iterable[_Union[MemberState, _Mapping]]] = ...) -> None: ...

class PingReqRequest(_message.Message):
    __slots__ = ("message", "target_name", "target_address")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    message: GossipMessage
    target_name: str
    target_address: str
    def __init__(self, message: _Optional[_Union[GossipMessage, _Mapping]] = ..., target_name: _Optional[str] = ..., target_address: _Optional[str] = ...) -> None: ...

class PingReqResponse(_message.Message):
    __slots__ = ("ack",)
    ACK_FIELD_NUMBER: _ClassVar[int]
    ack: bool
    def __init__(self, ack: _Optional[bool] = ...) -> None: ...
