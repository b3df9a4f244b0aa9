"""The client raises the classes of stimnet.errors, rebuilt from a failed call's status in
one place, with messages a researcher can act on."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from stimctl import client
from stimctl.client.errors import from_call_status, from_rpc_error, translated
from stimnet import errors, multiplex

ADDRESS = "127.0.0.1:7443"


class _RpcError(grpc.RpcError):
    """A failed call as grpc raises it: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str = "") -> None:
        self._code, self._details = code, details
        self._trailing = ((errors.ERROR_KIND_KEY, kind),) if kind else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


class TestFromCallStatus:
    @pytest.mark.parametrize("code, kind, cls", [
        ("RESOURCE_EXHAUSTED", "Overloaded", errors.Overloaded),
        ("RESOURCE_EXHAUSTED", "BudgetExhausted", errors.BudgetExhausted),
        ("RESOURCE_EXHAUSTED", "", errors.BudgetExhausted),
        ("FAILED_PRECONDITION", "Replayed", errors.Replayed),
        ("FAILED_PRECONDITION", "PrivacyRefusal", errors.Refused),
        ("INVALID_ARGUMENT", "QueryError", errors.QueryError),
        ("UNAUTHENTICATED", "", errors.Unauthenticated),
        ("PERMISSION_DENIED", "", errors.PermissionDenied),
        ("NOT_FOUND", "", errors.NotFound),
        ("INTERNAL", "", errors.StimnetError),
    ])
    def test_a_nodes_refusal_is_its_class_with_its_message(
            self, code: str, kind: str, cls: type[errors.StimnetError]) -> None:
        """The kind names the class; a kind the client does not know (a daemon-internal
        subclass) or none gives the class of the status code; the message is the node's."""
        err = from_call_status(code, "the node's reason", kind, ADDRESS)
        assert (type(err), err.args) == (cls, ("the node's reason",))

    def test_every_refusal_is_a_refused(self) -> None:
        """`except Refused` catches a conflict, a replay and the privacy budget alike."""
        got = [from_call_status(c, "r", k, ADDRESS) for c, k in (
            ("FAILED_PRECONDITION", "Conflict"), ("FAILED_PRECONDITION", "Replayed"),
            ("FAILED_PRECONDITION", "DataContractViolation"),
            ("FAILED_PRECONDITION", "IncompatiblePartials"), ("RESOURCE_EXHAUSTED", ""))]
        assert [isinstance(e, errors.Refused) for e in got] == [True] * 5

    def test_an_unreachable_node_is_connection_failed_naming_it(self) -> None:
        """UNAVAILABLE from the transport: the address and the first line of the reason."""
        err = from_call_status("UNAVAILABLE", "failed to connect\nmore detail", "", ADDRESS)
        assert (type(err), err.args[0]) == (
            errors.ConnectionFailed, f"cannot reach node at {ADDRESS}: failed to connect")

    # grpc's details as grpc-python gave them against real nodes (TLS front and gRPC-terminated;
    # the unknown_ca alert's is built like the others); the address in them is grpc's.
    _LAST = "failed to connect to all addresses; last error: "
    _TSI = ("UNKNOWN: ipv4:127.0.0.1:33095: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
            "SSL_ERROR_SSL: error:{code}:SSL routines:OPENSSL_internal:{reason}: OK")

    @pytest.mark.parametrize("details, cls, words", [
        (_LAST + _TSI.format(code="10000442", reason="TLSV1_ALERT_USER_CANCELLED"),
         errors.HandshakeLimited, "is limiting concurrent TLS handshakes (by default 32 at once "
                                  "from one address and 256 in all)"),
        (_LAST + _TSI.format(code="1000007d", reason="CERTIFICATE_VERIFY_FAILED: unable to get "
                                                     "local issuer certificate"),
         errors.ConnectionFailed, "we refused the node's certificate (unable to get local "
                                  "issuer certificate): it is not issued by the CA file"),
        (_LAST + "UNKNOWN: ipv4:127.0.0.1:33095: Custom verification check failed with error: "
                 "UNAUTHENTICATED: Hostname Verification Check failed.",
         errors.ConnectionFailed, "does not name the host in that address"),
        (_LAST + _TSI.format(code="10000418", reason="TLSV1_ALERT_UNKNOWN_CA"),
         errors.ConnectionFailed, "the node refused our certificate (unknown ca)"),
        (_LAST + "UNAVAILABLE: ipv4:127.0.0.1:33095: Handshake read failed (recvmsg:Connection "
                 "reset by peer (104))",
         errors.ConnectionFailed, "closed the connection during the TLS handshake without "
                                  "saying why: it may be limiting"),
        (_LAST + "UNAVAILABLE: ipv4:127.0.0.1:41869: Socket closed",
         errors.ConnectionFailed, 'if it terminates TLS in gRPC ([tls] terminate = "grpc"), it '
                                  "refused our certificate"),
        (_LAST + _TSI.format(code="10000410", reason="SSLV3_ALERT_HANDSHAKE_FAILURE"),
         errors.ConnectionFailed, "failed: UNKNOWN: ipv4:127.0.0.1:33095: Tls handshake failed"),
    ])
    def test_a_failed_handshake_says_which_side_refused_what(
            self, details: str, cls: type[errors.StimnetError], words: str) -> None:
        """The node's handshake limits, its refusing our certificate, our refusing its
        certificate or name, and a silent drop each get their own message; only the
        limit's alert is HandshakeLimited, and only a node's alert names our certificate."""
        err = from_call_status("UNAVAILABLE", details, "", ADDRESS)
        assert type(err) is cls and ADDRESS in err.args[0] and words in err.args[0], err.args
        if cls is errors.HandshakeLimited:
            assert "retry with backoff, or open fewer connections at once" in err.args[0]
            assert "[tls] max_handshakes_per_host" in err.args[0]
            assert "certificate" not in err.args[0]

    def test_a_missed_deadline_names_the_node(self) -> None:
        """DEADLINE_EXCEEDED from the transport: the node did not answer in time."""
        err = from_call_status("DEADLINE_EXCEEDED", "Deadline Exceeded", "", ADDRESS)
        assert (type(err), err.args[0]) == (
            errors.DeadlineExceeded, f"node at {ADDRESS} did not answer in time")

    def test_a_status_without_a_message_is_named_by_its_code(self) -> None:
        """An empty message becomes the status code's name, never an empty line."""
        assert from_call_status("NOT_FOUND", "", "", ADDRESS).args == ("NOT_FOUND",)


class TestTranslated:
    def test_a_grpc_error_becomes_its_class(self) -> None:
        """grpc.RpcError inside is raised as the class its status and kind stand for."""
        with pytest.raises(errors.Overloaded) as err, translated(ADDRESS):
            raise _RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "3 queries in flight",
                            "Overloaded")
        assert err.value.args == ("3 queries in flight",)

    def test_a_broken_session_is_connection_failed(self) -> None:
        """The Session stream breaking under a call: ConnectionFailed saying so."""
        with pytest.raises(errors.ConnectionFailed) as err, translated(ADDRESS):
            raise multiplex.StreamBroken("UNAVAILABLE: the node went away")
        assert err.value.args[0] == (f"lost the session with the node at {ADDRESS}: "
                                     "UNAVAILABLE: the node went away")

    def test_other_exceptions_pass_through(self) -> None:
        """Only grpc's and the multiplexer's exceptions are translated."""
        with pytest.raises(KeyError), translated(ADDRESS):
            raise KeyError("x")


def test_from_rpc_error_reads_the_kind_from_trailing_metadata() -> None:
    """The kind in `x-stimnet-error` tells apart refusals that share a code."""
    err = from_rpc_error(_RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "spent", "BudgetExhausted"),
                         ADDRESS)
    assert (type(err), err.args) == (errors.BudgetExhausted, ("spent",))


def test_the_clients_error_names_are_the_wire_classes() -> None:
    """stimctl.client exports the same classes as stimnet.errors (one vocabulary), under
    the names researchers catch."""
    assert (client.ClientError, client.NotAuthenticated, client.BudgetExhausted,
            client.Overloaded, client.JobFailed, client.ConnectionFailed) == (
        errors.StimnetError, errors.Unauthenticated, errors.BudgetExhausted,
        errors.Overloaded, errors.JobFailed, errors.ConnectionFailed)
