"""Client request ids: a write carrying one is applied once. Its result is kept in the same transaction as
the write, so a retry after a lost answer (the first call committed, its reply never arrived) gets the
first result back instead of applying the write again (a new random adapter, a second build, ...)."""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import lmdb

from services.common.errors import InvalidArgument
from services.knowledge_store.layout import StoreLayout

REQUESTS_KEPT = 100_000          # request ids remembered; a retry arrives within seconds, not after 100k writes
_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_REVISION = struct.Struct(">Q")
T = TypeVar("T")


@dataclass(frozen=True)
class Applied:
    """What the first call with a request id did and answered."""
    kind: str
    target: str
    revision: int
    result: dict[str, Any]


def check_request_id(request_id: str) -> str:
    if request_id and not _ID.match(request_id):
        raise InvalidArgument("request_id must be 1-128 printable ASCII characters without spaces (e.g. a UUID)")
    return request_id


def applied(layout: StoreLayout, txn: lmdb.Transaction, request_id: str, kind: str, target: str) -> Applied | None:
    """The earlier result of this request id, None when it is new; the same id on another call is refused."""
    if not request_id:
        return None
    raw = txn.get(request_id.encode(), db=layout.db["requests"])
    if raw is None:
        return None
    data = json.loads(bytes(raw))
    if data["kind"] != kind or data["target"] != target:
        raise InvalidArgument(f"request_id {request_id!r} was already used for {data['kind']} of "
                              f"{data['target']!r}; use a fresh id for every distinct call")
    return Applied(data["kind"], data["target"], data["revision"], data["result"])


def remember(layout: StoreLayout, txn: lmdb.Transaction, request_id: str, kind: str, target: str, revision: int,
             result: dict[str, Any]) -> None:
    """Keeps the result with the write (same transaction); forgets the oldest ids beyond REQUESTS_KEPT."""
    if not request_id:
        return
    txn.put(request_id.encode(), json.dumps({"kind": kind, "target": target, "revision": revision,
                                             "result": result}).encode(), db=layout.db["requests"])
    log_db = layout.db["request_log"]
    txn.put(_REVISION.pack(revision) + request_id.encode(), b"", db=log_db)
    if txn.stat(log_db)["entries"] > REQUESTS_KEPT:
        cursor = txn.cursor(db=log_db)
        if cursor.first():
            oldest = bytes(cursor.key())[_REVISION.size:]
            cursor.delete()
            txn.delete(oldest, db=layout.db["requests"])


def already_applied(layout: StoreLayout, request_id: str, kind: str, target: str) -> Applied | None:
    """The earlier result of a request id, read before a write's costly work (a build) is done again;
    `write_once` checks once more inside the write's transaction."""
    check_request_id(request_id)
    if not request_id:
        return None
    with layout.read() as txn:
        return applied(layout, txn, request_id, kind, target)


def write_once(layout: StoreLayout, request_id: str, kind: str, target: str,
               body: Callable[[lmdb.Transaction], tuple[T, int, dict[str, Any]]], replay: Callable[[Applied], T]) -> T:
    """Runs `body(txn)` -> (answer, revision, result) in one write transaction and keeps `result` under the
    request id in it; a request id already applied answers `replay(earlier)` instead, without running `body`."""
    check_request_id(request_id)

    def write(txn: lmdb.Transaction) -> T:
        earlier = applied(layout, txn, request_id, kind, target)
        if earlier is not None:
            return replay(earlier)
        answer, revision, result = body(txn)
        remember(layout, txn, request_id, kind, target, revision, result)
        return answer

    return layout.write(write)
