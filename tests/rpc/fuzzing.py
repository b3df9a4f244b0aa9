"""Seeded-random requests for the RPC fuzz test (test_fuzz_rpcs.py): protobuf messages
with random field values of each field's type (hostile ones often: extreme integers,
NaN/inf/5e-324, empty, huge or odd strings), signed job payloads mutated from valid ones
and signed with a real key, and raw bytes that are not, or only nearly, the request
message."""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from stimnet import pki
from stimnet.query.sql import parse_sql
from stimnet.signing import canonical, new_request
from stimnetd.testing import CertPaths

CATALOG = "dbs_outcomes"
# Multi-round federated models, each with 3 coefficients (intercept and two terms), all on
# one cohort: the fits' researcher would otherwise meet an overlap refusal of her own.
GLMS = tuple(f"SELECT glm('responder ~ age + amplitude_ma', '{family}', {maxit}) FROM dbs_outcomes"
             for family, maxit in (("binomial", 5), ("gaussian", 3), ("poisson", 4)))
SQL = (
    "SELECT count(*) FROM dbs_outcomes",
    "SELECT diagnosis, count(*), avg(age) FROM dbs_outcomes WHERE age >= 30 GROUP BY diagnosis",
    "SELECT corr(age, updrs_change) FROM dbs_outcomes WHERE sex IN ('F')",
    "SELECT sum(amplitude_ma), variance(disease_duration) FROM dbs_outcomes "
    "WHERE frequency_hz BETWEEN 100 AND 200 AND NOT improvement_pct IS NULL",
    "SELECT target, avg(improvement_pct) FROM dbs_outcomes GROUP BY target",
    "SELECT regress(updrs_change, age) FROM dbs_outcomes WHERE diagnosis = 'PD'",
    "SELECT median(age), quantile(age, 0.9), histogram(age, 20, 40, 60) FROM dbs_outcomes",
    "SELECT quantile_exact(disease_duration, 0.25) FROM dbs_outcomes",
    "SELECT meta(glm('responder ~ age', 'binomial')) FROM dbs_outcomes",
    *GLMS,
)

FIELDS = ("subject_id", "age", "sex", "diagnosis", "disease_duration", "target", "hemisphere",
          "amplitude_ma", "frequency_hz", "pulse_width_us", "vta_path", "updrs_off", "updrs_on",
          "updrs_change", "improvement_pct", "responder", "no_such_field", "")
LEVELS = ("F", "M", "PD", "ET", "STN", "GPi", "left", "bilateral", "", "é")
FLOATS = (0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, -5e-324, 1e308, -1e308, 1e-6,
          0.5, 1.0, 2.0, 30.0, 86400.0, 86401.0, 1e18, -1.0)
INTS = (0, 1, -1, 2, 7, 255, 256, 1000, 1001, 2**31 - 1, -2**31, 2**32 - 1, 2**53 + 1,
        2**63 - 1, -2**63, 2**64 - 1)
STRINGS = ("", " ", "dbs_outcomes", "fuzz-a", "fuzz-b", "alice", "ops", "\x00", "../../etc/passwd",
           "'; DROP TABLE jobs; --", "%s%n%x", "\u202e\u0301\ufeff", "é" * 3, "😀" * 40,
           "0" * 24, "f" * 24, "a" * 64, "127.0.0.1:1", "localhost:0", "[::1]:65536",
           "alive", "dead", "suspect", "left", "query", "script", "local", "federated")


def _int_range(t: int) -> tuple[int, int]:
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return 0, 2**32 - 1
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return 0, 2**64 - 1
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED32):
        return -2**31, 2**31 - 1
    return -2**63, 2**63 - 1


def rand_float(rng: random.Random) -> float:
    r = rng.random()
    if r < 0.5:
        return rng.choice(FLOATS)
    if r < 0.8:
        return rng.uniform(-1e3, 1e3)
    return rng.uniform(-1, 1) * 10.0 ** rng.randint(-320, 308)


def rand_int(rng: random.Random, lo: int, hi: int) -> int:
    if rng.random() < 0.6:
        edges = [v for v in INTS if lo <= v <= hi] + [lo, hi]
        return rng.choice(edges)
    return rng.randint(max(lo, -10**6), min(hi, 10**6)) if rng.random() < 0.5 \
        else rng.randint(lo, hi)


def rand_str(rng: random.Random, hints: tuple[str, ...] = ()) -> str:
    r = rng.random()
    if hints and r < 0.3:
        return rng.choice(hints)
    if r < 0.6:
        return rng.choice(STRINGS)
    if r < 0.8:
        return "".join(chr(rng.choice((rng.randint(32, 126), rng.randint(0x80, 0xD7FF),
                                       rng.randint(0xE000, 0x10FFFF))))
                       for _ in range(rng.randint(1, 40)))
    return rng.choice("xé😀") * rng.choice((1000, 70_000, 300_000))


def rand_bytes(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.2:
        return b""
    if r < 0.4:
        return rand_str(rng).encode()
    if r < 0.5:
        return b"\xff\xfe" * rng.randint(1, 1000)
    return rng.randbytes(rng.choice((1, 16, 64, 1024, 100_000)))


def rand_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice((None, True, False, rng.choice(INTS), 10**rng.randint(20, 400),
                           -(10**30), rng.choice(FLOATS[5:]), rand_float(rng), rand_str(rng),
                           "NaN", "Infinity", 5e-324))
    if r < 0.65:
        # Deep nesting: a reader that recurses without a bound overflows its stack.
        deep: Any = rng.choice(([], {}))
        for _ in range(rng.choice((10, 200, 5000))):
            deep = [deep] if rng.random() < 0.5 else {"op": "not", "arg": deep}
        return deep
    if r < 0.8:
        return [rand_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    return {rand_str(rng, ("op", "field", "value", "args", "func", "fields", "name", "params",
                           "catalog", "where")): rand_json(rng, depth + 1)
            for _ in range(rng.randint(0, 5))}


# --------------------------------------------------------------------------- query specs


def _value(rng: random.Random) -> Any:
    return rng.choice((rng.choice(LEVELS), rng.choice(INTS), rng.choice(FLOATS[5:]),
                       rng.uniform(-100, 100), 10**rng.randint(16, 400), True, None, []))


def rand_where(rng: random.Random, depth: int = 0) -> Any:
    """A filter of the right shape with values of any type (operators, fields, values)."""
    field_ = rng.choice(FIELDS)
    r = rng.random()
    if depth < 3 and r < 0.25:
        op = rng.choice(("and", "or", "not"))
        if op == "not":
            return {"op": "not", "arg": rand_where(rng, depth + 1)}
        return {"op": op, "args": [rand_where(rng, depth + 1) for _ in range(rng.randint(0, 3))]}
    if r < 0.6:
        return {"op": rng.choice(("=", "!=", "<", "<=", ">", ">=", "~", "")), "field": field_,
                "value": _value(rng)}
    if r < 0.75:
        return {"op": "in", "field": field_, "negated": rng.random() < 0.3,
                "values": [_value(rng) for _ in range(rng.choice((0, 1, 3, 2000)))]}
    if r < 0.9:
        return {"op": "between", "field": field_, "low": _value(rng), "high": _value(rng),
                "negated": rng.random() < 0.3}
    return {"op": "is_null", "field": field_, "negated": rng.choice((True, False, 1, None))}


def rand_spec(rng: random.Random) -> dict[str, Any]:
    """A query spec of the right shape: any functions, fields, parameters and groups."""
    from stimnet.query.spec import FUNCS, IMAGE_FUNCS

    funcs = sorted(set(FUNCS) - IMAGE_FUNCS) if rng.random() < 0.95 else sorted(FUNCS)
    aggs = []
    for _ in range(rng.choice((0, 1, 1, 2, 3, 40))):
        func = rng.choice((*funcs, "nope"))
        shape = FUNCS.get(func)
        k = (shape.min_fields if shape else 1) + rng.choice((0, 0, 0, 1, -1))
        params = [rng.choice((rng.random(), rng.uniform(-10, 300), rng.choice(FLOATS[5:]),
                              rng.choice(INTS))) for _ in range(rng.choice((0, 0, 1, 3, 10, 300)))]
        if rng.random() < 0.5:
            params.sort()
        aggs.append({"func": func, "fields": [rng.choice(FIELDS) for _ in range(max(0, k))],
                     "name": rng.choice((func, "x", "", "😀" * 300)), "params": params})
    return {"catalog": rng.choice((CATALOG, CATALOG, "other")), "aggregates": aggs,
            "where": rand_where(rng) if rng.random() < 0.6 else None,
            "group_by": [rng.choice(FIELDS) for _ in range(rng.choice((0, 0, 1, 2, 5)))]}


# --------------------------------------------------------------------------- signed jobs


@dataclass
class Signer:
    """Signs fuzzed payloads with a real key, so that they get past the signature check
    to the payload's own checks."""

    certs: CertPaths
    key: Any = field(init=False)
    cert_pem: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.key = load_pem_private_key(self.certs.key.read_bytes(), password=None)
        self.cert_pem = self.certs.cert.read_bytes()

    def sign(self, payload: bytes) -> bytes:
        return pki.sign_payload(self.key, payload)


def base_doc(rng: random.Random, entry: str) -> tuple[dict[str, Any], bytes]:
    """A valid job payload (as a dict) and its script (b"" for a query)."""
    kind = "script" if rng.random() < 0.15 else "query"
    script = b"print(1)\n" if kind == "script" else None
    epsilon = rng.choice((None, None, None, None, 0.5, 1.0, 5e-324, 1e-6, 1e-7, 1e6))
    spec = (parse_sql(rng.choice(SQL)).to_dict() if rng.random() < 0.5 else rand_spec(rng)) \
        if kind == "query" else None
    req = new_request(kind, CATALOG, entry=entry, scope=rng.choice(("local", "federated")),
                      spec=spec, script=script, epsilon=epsilon if epsilon != 1e-7 else None,
                      min_sites=rng.choice((1, 1, 2)))
    doc = json.loads(req.to_payload())
    if epsilon == 1e-7:
        doc["epsilon"] = 1e-7  # below the minimum, past the client's own check
    return doc, script or b""


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if len(prefix) > 6:  # not into the deep nests rand_json makes
        return out
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def mutate_doc(rng: random.Random, doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with 0-3 of its values (at any depth) replaced, removed or added to."""
    for _ in range(rng.choice((0, 0, 0, 1, 1, 2, 3))):
        path = rng.choice(_paths(doc)[1:])
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        r = rng.random()
        if r < 0.75:
            parent[path[-1]] = rand_json(rng)
        elif r < 0.85 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rand_str(rng)] = rand_json(rng)
        else:
            parent.append(rand_json(rng))
    return doc


def payload_bytes(rng: random.Random, doc: dict[str, Any]) -> bytes:
    r = rng.random()
    try:
        if r < 0.9:
            return canonical(doc)
        if r < 0.95:
            return json.dumps(doc).encode()  # not canonical
    except (ValueError, RecursionError):
        pass
    return rng.choice((b"", b"{", b"[]", b"\xff\xfe{}", b"{\"v\":NaN}", b"1e999",
                       b"[" * 100_000, rand_bytes(rng)))


def signed_job(rng: random.Random, msg: Message, signer: Signer, others: list[Signer],
               entry: str) -> None:
    """Fill SignedJob `msg`: a mutated payload, signed (usually by `signer`)."""
    doc, script = base_doc(rng, entry)
    payload = payload_bytes(rng, mutate_doc(rng, doc))
    who = signer if rng.random() < 0.85 else rng.choice(others)
    msg.payload = payload
    r = rng.random()
    msg.signature = who.sign(payload) if r < 0.95 else rand_bytes(rng)
    msg.signer_cert_pem = who.cert_pem if rng.random() < 0.97 else rand_bytes(rng)
    msg.script = script if rng.random() < 0.9 else rand_bytes(rng)


def glm_job(rng: random.Random, signer: Signer, entry: str) -> Message:
    """A valid federated GLM job relayed by `entry`, whose later rounds the fuzz sends
    with random parameter vectors."""
    from stimnet.v1 import common_pb2

    req = new_request("query", CATALOG, entry=entry, scope="federated",
                      spec=parse_sql(rng.choice(GLMS)).to_dict())
    payload = req.to_payload()
    return common_pb2.SignedJob(payload=payload, signature=signer.sign(payload),
                                signer_cert_pem=signer.cert_pem)


def fresh_nonce() -> str:
    return secrets.token_hex(16)


def now() -> float:
    return round(time.time(), 3)


# --------------------------------------------------------------------------- messages

# A hook fills one field itself (returns True), keyed by field full name or message full
# name; the test supplies hooks for signed jobs, job ids and gossip senders.
Hook = Callable[[random.Random, Message, FieldDescriptor | None], bool]


def request_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _scalar(rng: random.Random, f: FieldDescriptor) -> Any:
    t = f.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        v = rand_float(rng)
        return v if t == FieldDescriptor.TYPE_DOUBLE or not math.isfinite(v) \
            or abs(v) < 3e38 else math.copysign(math.inf, v)
    if t == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FieldDescriptor.TYPE_STRING:
        return rand_str(rng)
    if t == FieldDescriptor.TYPE_BYTES:
        return rand_bytes(rng)
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in f.enum_type.values]
        return rng.choice(values) if rng.random() < 0.8 else rand_int(rng, -2**31, 2**31 - 1)
    return rand_int(rng, *_int_range(t))


def fill(rng: random.Random, msg: Message, hooks: dict[str, Hook], depth: int = 0) -> Message:
    """Set a random subset of `msg`'s fields to random values of their types."""
    hook = hooks.get(msg.DESCRIPTOR.full_name)
    if hook is not None and hook(rng, msg, None):
        return msg
    for f in msg.DESCRIPTOR.fields:
        hook = hooks.get(f.full_name)
        if hook is not None and hook(rng, msg, f):
            continue
        if rng.random() < 0.35:
            continue
        _fill_field(rng, msg, f, hooks, depth)
    return msg


def _fill_field(rng: random.Random, msg: Message, f: FieldDescriptor, hooks: dict[str, Hook],
                depth: int) -> None:
    is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
    repeated = f.is_repeated
    count = rng.choice((0, 1, 2, 5, 50)) if repeated else 1
    if f.message_type is not None and depth > 3:
        return
    if is_map:
        key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        target = getattr(msg, f.name)
        for _ in range(count):
            k = _scalar(rng, key_f)
            if value_f.message_type is not None:
                fill(rng, target[k], hooks, depth + 1)
            else:
                target[k] = _scalar(rng, value_f)
    elif f.message_type is not None:
        if repeated:
            for _ in range(count):
                fill(rng, getattr(msg, f.name).add(), hooks, depth + 1)
        else:
            sub = getattr(msg, f.name)
            sub.SetInParent()
            fill(rng, sub, hooks, depth + 1)
    elif repeated:
        getattr(msg, f.name).extend(_scalar(rng, f) for _ in range(count))
    else:
        setattr(msg, f.name, _scalar(rng, f))


# --------------------------------------------------------------------------- raw bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_request(rng: random.Random, valid: bytes, descriptor: Descriptor) -> bytes:
    """Bytes that are not, or only nearly, a `descriptor` message made from `valid`."""
    r = rng.random()
    if r < 0.25:
        return rand_bytes(rng)
    if r < 0.45 and valid:
        cut = rng.randint(0, len(valid) - 1)
        return valid[:cut]  # truncated
    if r < 0.65 and valid:
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    fields = list(descriptor.fields)
    if r < 0.85 and fields:
        # A known field with the wrong wire type, or a string field that is not UTF-8.
        f = rng.choice(fields)
        wire = rng.choice((0, 1, 2, 5))
        body = {0: _varint(rng.randrange(2**64)), 1: rng.randbytes(8), 5: rng.randbytes(4),
                2: _varint(4) + b"\xff\xfe\xc0\x80"}[wire]
        return valid + _varint(f.number << 3 | wire) + body
    # An unknown field number, a group wire type, or a length past the end.
    return valid + rng.choice((_varint(rng.randint(1, 2**29 - 1) << 3 | 3),
                               _varint(9 << 3 | 2) + _varint(2**40), b"\x80" * 11))
