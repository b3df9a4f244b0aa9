"""The researcher's and operator's client: it speaks the wire contract (`stimnet`) only.

`AsyncClient` is for asyncio code, `Client` for scripts and notebooks; both raise the
classes of `stimnet.errors`, re-exported here under the names researchers catch.

    errors.py        grpc's exceptions -> stimnet.errors, in one place
    config.py        ClientConfig (client.toml)
    job_requests.py  job requests built and refused before sending
    events.py        a job's events: assembly, de-duplication, following to the answer
    aio.py           AsyncClient
    sync.py          Client
"""

from stimctl.client.aio import AsyncClient
from stimctl.client.config import DEFAULT_CONFIG, ClientConfig
from stimctl.client.errors import (
    BudgetExhausted,
    ClientError,
    ConfigProblem,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    HandshakeLimited,
    InvalidRequest,
    JobFailed,
    NotAuthenticated,
    NotFound,
    Overloaded,
    PermissionDenied,
    Refused,
    StimnetError,
    Unauthenticated,
    Unavailable,
)
from stimctl.client.events import Event, EventKind, OnEvent
from stimctl.client.sync import Client

__all__ = [
    "DEFAULT_CONFIG", "AsyncClient", "BudgetExhausted", "Client", "ClientConfig", "ClientError",
    "ConfigProblem", "Conflict", "ConnectionFailed", "DeadlineExceeded", "Event", "EventKind",
    "HandshakeLimited", "InvalidRequest", "JobFailed", "NotAuthenticated", "NotFound", "OnEvent",
    "Overloaded", "PermissionDenied", "Refused", "StimnetError", "Unauthenticated", "Unavailable",
]
