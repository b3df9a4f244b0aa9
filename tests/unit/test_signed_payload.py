"""The signed job payload: what it must hold, and how an unacceptable one is named."""

from __future__ import annotations

import json

import pytest

from stimnet.errors import InvalidRequest
from stimnet.signing import PAYLOAD_VERSION, JobRequest, canonical, new_request

SPEC = {"catalog": "c", "where": None, "group_by": [],
        "aggregates": [{"func": "count", "fields": [], "name": "n", "params": []}]}


def _doc(**changes: object) -> dict:
    doc = json.loads(new_request("query", "c", entry="site-a", spec=SPEC).to_payload())
    doc.update(changes)
    return doc


def test_the_payload_round_trips_with_its_entry_node() -> None:
    """A signed payload reads back equal to the request, naming its entry node, at the current
    version."""
    req = new_request("query", "c", entry="site-a", spec=SPEC, scope="federated", epsilon=0.5)
    back = JobRequest.from_payload(req.to_payload())
    assert back == req and back.entry == "site-a" and back.v == PAYLOAD_VERSION == 2


def test_a_version_1_payload_is_refused_saying_why() -> None:
    """A payload of another version is refused naming its version, not as unknown keys."""
    doc = _doc(v=1)
    del doc["entry"]
    with pytest.raises(InvalidRequest, match=r"version 1 is not supported \(this node accepts "
                                             r"version 2, which names the entry node"):
        JobRequest.from_payload(canonical(doc))


@pytest.mark.parametrize("entry", ["", 7, None, "x" * 256])
def test_a_payload_without_a_usable_entry_node_is_refused(entry: object) -> None:
    """An entry node that is empty, not text or too long is refused by name."""
    with pytest.raises(InvalidRequest, match="a job names its entry node"):
        JobRequest.from_payload(canonical(_doc(entry=entry)))


def test_a_payload_missing_the_entry_key_is_refused() -> None:
    """A payload without the entry key is refused as one whose keys differ."""
    doc = _doc()
    del doc["entry"]
    with pytest.raises(InvalidRequest, match="payload keys differ"):
        JobRequest.from_payload(canonical(doc))


def _with(text: bytes, old: bytes, new: bytes) -> bytes:
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize("old, new, problem", [
    (b'"epsilon":null', b'"epsilon":NaN', "not JSON: NaN is not a JSON number"),
    (b'"epsilon":null', b'"epsilon":-Infinity', "not JSON: -Infinity is not a JSON number"),
    (b'"epsilon":null', b'"epsilon":1e999', "a number out of float range"),
    (b'"min_sites":1', b'"min_sites":' + b"9" * 5000, "not JSON: Exceeds the limit"),
])
def test_numbers_json_cannot_carry_are_refused_by_name(old: bytes, new: bytes,
                                                       problem: str) -> None:
    """Each is refused as an InvalidRequest naming the problem, not an internal error at
    every site."""
    payload = new_request("query", "c", entry="site-a", spec=SPEC).to_payload()
    with pytest.raises(InvalidRequest, match=problem):
        JobRequest.from_payload(_with(payload, old, new))


@pytest.mark.parametrize("key, problem", [("epsilon", "epsilon must be a finite number"),
                                          ("issued_at", "issued_at must be unix seconds")])
def test_an_integer_no_float_can_hold_is_refused_by_name(key: str, problem: str) -> None:
    """A 401-digit integer literal is valid JSON but overflows every float comparison made with
    it: refused as an InvalidRequest (the RPC fuzz found it as an internal error, seed 26)."""
    with pytest.raises(InvalidRequest, match=problem):
        JobRequest.from_payload(canonical(_doc(**{key: 10 ** 400})))


@pytest.mark.parametrize("kind", ["query", "script"])
@pytest.mark.parametrize("value, named", [(None, "null"), (5, "a number"), (True, "a boolean"),
                                          ([], "an array"), ({}, "an object")])
def test_a_script_sha256_that_is_not_a_string_is_refused_by_name(kind: str, value: object,
                                                                  named: str) -> None:
    """A mistyped script_sha256 is named at parse time, not left for the store's NOT NULL."""
    with pytest.raises(InvalidRequest, match=f"script_sha256 must be a string .*, not {named}$"):
        JobRequest.from_payload(canonical(_doc(kind=kind, script_sha256=value)))


def test_a_query_job_carries_no_script_hash() -> None:
    with pytest.raises(InvalidRequest, match="script_sha256 must be empty for a query job"):
        JobRequest.from_payload(canonical(_doc(script_sha256="ab" * 32)))
