"""Addresses from config or gossip are parsed before any connection is tried."""

from __future__ import annotations

import pytest

from stimnetd.rpc.peer_identity import PeerIdentityError, split_address


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:7443", ("127.0.0.1", 7443)),
    ("[::1]:7443", ("::1", 7443)),
    ("hospital-a.example.org:443", ("hospital-a.example.org", 443)),
])
def test_good_addresses(address: str, expected: tuple[str, int]) -> None:
    """host:port, bracketed IPv6 and DNS names split into host and port."""
    assert split_address(address) == expected


@pytest.mark.parametrize(("address", "why"), [
    ("host", "is not host:port"), (":80", "is not host:port"), ("host:", "is not host:port"),
    ("host:99999", "is not host:port"), ("host:0", "is not host:port"),
    ("host:\u0661\u0662", "is not host:port"),  # Arabic-Indic digits pass str.isdigit()
    ("\udcff:80", "does not name a host"), ("a" * 300 + ":80", "does not name a host"),
])
def test_bad_addresses_are_named(address: str, why: str) -> None:
    """A gossip entry's address is data from another node: a bad one is a clear error,
    never an OverflowError or UnicodeError from deep in the socket layer."""
    with pytest.raises(PeerIdentityError, match=why):
        split_address(address)
