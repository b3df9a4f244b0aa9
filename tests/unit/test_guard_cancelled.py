"""A call whose caller has gone (cancelled, or its deadline passed) while the handler
failed is cancelled, not an internal error: grpc health's Check raised from its own
abort (the status could not be sent) and the guard logged INTERNAL with a traceback."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stimnet.pki import Identity
from stimnetd import logs
from stimnetd.rpc.guard import Guard, Revocations


class _Identities:
    def identity(self, context: Any) -> Identity:
        return Identity("node-b", "node", 1, datetime.now(UTC) + timedelta(days=1))

    def who(self, context: Any) -> tuple[str, str, dict[str, str]]:
        return ("node-b", "node", {})


class _GoneContext:
    """A call whose client has cancelled it (or not yet known to have: `cancelled`)."""

    def __init__(self, cancelled: bool) -> None:
        self._cancelled = cancelled

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def cancelled(self) -> bool:
        return self._cancelled

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise AssertionError(f"abort({code}, {details!r}) on a call whose caller is gone")


@pytest.mark.parametrize("known", [True, False])
async def test_a_failure_after_the_caller_left_is_cancelled_not_internal(known: bool) -> None:
    from grpc._cython import cygrpc

    out = io.StringIO()
    logs.configure("info", stream=out)
    guard = Guard(identities=_Identities(), revocations=Revocations(),  # type: ignore[arg-type]
                  audit_refusal=lambda *a: asyncio.sleep(0),
                  audit_allowed=lambda *a: None)

    async def check(request: Any, context: Any) -> Any:
        # What the status that could not be sent raises, whether or not the call is known
        # to be cancelled yet.
        raise cygrpc.ExecuteBatchError("Failed \"execute_batch\": (SendStatusFromServerOperation,)")

    wrapper = guard._wrap_unary("/grpc.health.v1.Health/Check", check)  # noqa: SLF001
    with pytest.raises(asyncio.CancelledError):
        await wrapper(object(), _GoneContext(known))
    assert "Traceback" not in out.getvalue() and '"status": "CANCELLED"' in out.getvalue()
