"""A small etcd v3 client over etcd's own JSON gateway, standard library only.

etcd (3.4 and later) serves its v3 API as JSON on the client port too
(grpc-gateway, under ``/v3/``): keys and values base64, 64-bit integers as
strings.  Unary requests (range, put, delete, transactions, leases) go over
`http.client`, blocking, so that the lease can be renewed from a plain thread
while the event loop is busy; the watch is a chunked HTTP response read with
asyncio streams, one JSON object per line.  docs/scale.md ("Choosing the etcd
client") says why this and not a client from PyPI.

Several endpoints: each request goes to the one that answered last and fails
over to the others in turn; none reachable raises `Unreachable`.  An answer
that is not what the gateway sends raises `ProtocolError`; etcd refusing a
request raises `EtcdRefused` (a ProtocolError carrying etcd's gRPC code).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import logging
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from malla.exceptions import InvalidOption, ProtocolError, Unreachable

__all__ = ["KV", "EtcdClient", "EtcdRefused", "EtcdUrl", "parse_url", "prefix_end"]

log = logging.getLogger("malla.etcd")

T = TypeVar("T")

# gRPC status codes etcd answers with (the gateway's "code")
NOT_FOUND = 5
# etcd's default client port, for an endpoint given without one
DEFAULT_PORT = 2379
# the longest answer line we accept from the gateway: a watch line carries up
# to a batch of records (etcd's request limit is 1.5 MiB by default)
MAX_LINE = 16 << 20


class EtcdRefused(ProtocolError):
    """etcd answered with an error (``code``: its gRPC status code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EtcdUrl:
    """``etcd://HOST:PORT[,HOST:PORT...]/PREFIX`` parsed: TLS for ``etcds://``."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str
    tls: bool


@dataclass(frozen=True)
class KV:
    """One key as etcd returns it (value empty for a deletion)."""

    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


def parse_url(url: str) -> EtcdUrl:
    """Parse a discovery URL; `InvalidOption` when it is not one.  The
    prefix is kept without its trailing slash ("/malla" for
    ``etcd://h:2379/malla/``); an empty prefix is refused (the cluster's
    keys must not mix with everything else in etcd)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise InvalidOption(f"not an etcd URL (etcd://HOST:PORT/PREFIX): {url!r}")
    hosts, slash, prefix = rest.partition("/")
    prefix = "/" + prefix.strip("/")
    if not slash or prefix == "/":
        raise InvalidOption(f"the etcd URL needs a prefix (etcd://HOST:PORT/PREFIX): {url!r}")
    endpoints = []
    for item in hosts.split(","):
        try:
            parsed = urllib.parse.urlsplit("//" + item)
            host, port = parsed.hostname, parsed.port or DEFAULT_PORT
        except ValueError as exc:
            raise InvalidOption(f"bad etcd endpoint {item!r} in {url!r}: {exc}") from None
        if not host:
            raise InvalidOption(f"empty etcd endpoint in {url!r}")
        endpoints.append((host, port))
    return EtcdUrl(tuple(endpoints), prefix, scheme == "etcds")


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (etcd's
    convention: the prefix with its last byte incremented)."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1])) if raw[-1] < 0xFF else _b64(b"\0")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"etcd: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("etcd: bad base64 in an answer") from None


def _int(obj: dict[str, Any], field: str) -> int:
    """A 64-bit integer field (the gateway sends them as strings, and leaves
    out zeros)."""
    value = obj.get(field, 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"etcd: field {field!r} is not an integer: {value!r}") from None


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"etcd: {what} is not an object")
    return obj


def kv_of(obj: Any) -> KV:
    """A KeyValue of an answer."""
    kv = _map(obj, "a key-value")
    return KV(_unb64(kv.get("key", "")).decode("utf-8", "replace"),
              _unb64(kv.get("value", "")), _int(kv, "mod_revision"),
              _int(kv, "create_revision"), _int(kv, "lease"))


def revision_of(answer: dict[str, Any]) -> int:
    return _int(_map(answer.get("header", {}), "the header"), "revision")


def _refusal(body: dict[str, Any]) -> EtcdRefused | None:
    error = body.get("error")
    if error is None:
        return None
    if isinstance(error, dict):    # a stream's error: {"error": {"message", "grpc_code", ...}}
        return EtcdRefused(f"etcd: {error.get('message')}", int(error.get("grpc_code", 2)))
    return EtcdRefused(f"etcd: {body.get('message', error)}", int(body.get("code", 2)))


class EtcdClient:
    """Blocking unary requests (thread-safe: one connection per thread and
    endpoint) and an asyncio watch, failing over between `endpoints`."""

    def __init__(self, endpoints: tuple[tuple[str, int], ...] | list[tuple[str, int]], *,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = 2.0) -> None:
        if not endpoints:
            raise InvalidOption("an etcd client needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._preferred = 0
        self._local = threading.local()

    @classmethod
    def from_url(cls, url: str | EtcdUrl, *, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 2.0) -> EtcdClient:
        """The client of a discovery URL (``etcds://``: TLS, with
        `ssl_context` or the system's default trust)."""
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.tls and ssl_context is None:
            ssl_context = ssl.create_default_context()
        return cls(parsed.endpoints, ssl_context=ssl_context if parsed.tls else None,
                   timeout=timeout)

    # -- transport --------------------------------------------------------------

    def _order(self) -> list[int]:
        first = self._preferred
        return [first] + [i for i in range(len(self.endpoints)) if i != first]

    def _connection(self, index: int) -> http.client.HTTPConnection:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("c", {})
        conn = conns.get(index)
        if conn is None:
            host, port = self.endpoints[index]
            if self.ssl_context is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=self.ssl_context)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            conns[index] = conn
        return conn

    def _drop(self, index: int) -> None:
        conn = self._local.__dict__.get("c", {}).pop(index, None)
        if conn is not None:
            conn.close()

    def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to ``/v3/<path>`` on the first endpoint that answers."""
        data = json.dumps(body).encode()
        failures = []
        for index in self._order():
            try:
                status, raw = self._post(index, path, data)
            except (OSError, http.client.HTTPException) as exc:
                # refused, reset, timed out, TLS failure: the next endpoint
                failures.append(f"{self._name(index)}: {exc or type(exc).__name__}")
                continue
            if status == 503:    # no leader, or shutting down: another member may serve
                failures.append(f"{self._name(index)}: HTTP 503")
                continue
            if index != self._preferred:
                log.info("malla: etcd endpoint %s answers now", self._name(index))
                self._preferred = index
            return self._answer(status, raw)
        raise Unreachable("no etcd endpoint reachable: " + "; ".join(failures))

    def _post(self, index: int, path: str, data: bytes) -> tuple[int, bytes]:
        """One POST; a kept-alive connection that turns out dead (etcd
        restarted, or closed it idle) is replaced once by a fresh one."""
        for attempt in (0, 1):
            fresh = index not in self._local.__dict__.get("c", {})
            conn = self._connection(index)
            try:
                conn.request("POST", "/v3/" + path, data, {"Content-Type": "application/json"})
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                self._drop(index)
                if fresh or attempt:
                    raise
        raise AssertionError("unreachable")

    def _name(self, index: int) -> str:
        host, port = self.endpoints[index]
        return f"{host}:{port}"

    @staticmethod
    def _answer(status: int, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise ProtocolError(f"etcd: HTTP {status}, not JSON: {raw[:200]!r}") from None
        body = _map(body, "the answer")
        refused = _refusal(body)
        if refused is not None:
            raise refused
        if status != 200:
            raise ProtocolError(f"etcd: HTTP {status} without an error: {raw[:200]!r}")
        return body

    def close(self) -> None:
        """Close this thread's connections (others close with their threads)."""
        for index in list(self._local.__dict__.get("c", {})):
            self._drop(index)

    # -- keys ----------------------------------------------------------------------

    def get_prefix(self, prefix: str) -> tuple[int, list[KV]]:
        """(store revision, every key under `prefix`)."""
        answer = self.request("kv/range", {"key": _b64(prefix.encode()),
                                           "range_end": prefix_end(prefix)})
        kvs = answer.get("kvs", [])
        if not isinstance(kvs, list):
            raise ProtocolError("etcd: kvs is not a list")
        return revision_of(answer), [kv_of(kv) for kv in kvs]

    def get(self, key: str) -> KV | None:
        answer = self.request("kv/range", {"key": _b64(key.encode())})
        kvs = answer.get("kvs", [])
        return kv_of(kvs[0]) if isinstance(kvs, list) and kvs else None

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Store `value` (attached to `lease` when not 0); the new revision."""
        answer = self.request("kv/put", {"key": _b64(key.encode()), "value": _b64(value),
                                         "lease": str(lease)})
        return revision_of(answer)

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete `key` (every key under it with `prefix`); how many went."""
        body = {"key": _b64(key.encode())}
        if prefix:
            body["range_end"] = prefix_end(key)
        return _int(self.request("kv/deleterange", body), "deleted")

    def delete_under(self, key: str, lease: int) -> bool:
        """Delete `key` only if it is kept under `lease` (one transaction):
        whether it was."""
        k = _b64(key.encode())
        answer = self.request("kv/txn", {
            "compare": [{"target": "LEASE", "key": k, "result": "EQUAL", "lease": str(lease)}],
            "success": [{"request_delete_range": {"key": k}}]})
        return answer.get("succeeded", False) is True

    def create(self, key: str, value: bytes, lease: int = 0) -> tuple[bool, KV | None]:
        """Store `value` only if `key` does not exist (one transaction):
        (True, None) when created, else (False, the key as it is)."""
        k = _b64(key.encode())
        answer = self.request("kv/txn", {
            "compare": [{"target": "CREATE", "key": k, "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": k, "value": _b64(value),
                                         "lease": str(lease)}}],
            "failure": [{"request_range": {"key": k}}]})
        if answer.get("succeeded", False) is True:
            return True, None
        try:
            kvs = answer["responses"][0]["response_range"].get("kvs", [])
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ProtocolError("etcd: a failed transaction without its range") from None
        # (an empty range: the holder's lease expired between compare and range)
        return False, kv_of(kvs[0]) if kvs else None

    # -- leases -------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""
        lease = _int(self.request("lease/grant", {"TTL": str(ttl)}), "ID")
        if lease == 0:
            raise ProtocolError("etcd: a lease granted without an id")
        return lease

    def keepalive(self, lease: int) -> int:
        """Renew `lease`: its TTL again, or 0 when it expired (or never was)."""
        answer = self.request("lease/keepalive", {"ID": str(lease)})
        return _int(_map(answer.get("result", {}), "the keepalive result"), "TTL")

    def revoke(self, lease: int) -> bool:
        """Revoke `lease` (its keys go with it); False when it was gone."""
        try:
            self.request("lease/revoke", {"ID": str(lease)})
        except EtcdRefused as exc:
            if exc.code == NOT_FOUND:
                return False
            raise
        return True

    # -- watch --------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int
                    ) -> AsyncIterator[dict[str, Any]]:
        """The watch responses (the gateway's ``result`` objects) of every
        change under `prefix` from `start_revision` on, until the stream
        ends (`Unreachable` when it ends or no endpoint answers: the caller
        resumes from the revision it last saw)."""
        reader, writer = await self._open_watch(prefix, start_revision)
        lines = _lines(reader)
        try:
            while True:
                try:
                    line = await lines.__anext__()
                except StopAsyncIteration:
                    break
                except (OSError, asyncio.IncompleteReadError) as exc:
                    raise Unreachable(f"the etcd watch broke: {exc or type(exc).__name__}"
                                      ) from None
                except asyncio.LimitOverrunError:
                    raise ProtocolError("etcd: a watch line without its end") from None
                try:
                    message = _map(json.loads(line), "a watch message")
                except ValueError:
                    raise ProtocolError(f"etcd: a watch line is not JSON: {line[:200]!r}"
                                        ) from None
                refused = _refusal(message)
                if refused is not None:
                    raise refused
                yield _map(message.get("result", {}), "a watch result")
        finally:
            await lines.aclose()
            writer.close()
        raise Unreachable("the etcd watch stream ended")

    async def _open_watch(self, prefix: str, start_revision: int
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        body = json.dumps({"create_request": {
            "key": _b64(prefix.encode()), "range_end": prefix_end(prefix),
            "start_revision": str(start_revision)}}).encode()
        failures = []
        for index in self._order():
            host, port = self.endpoints[index]
            try:
                reader, writer = await _within(asyncio.open_connection(
                    host, port, ssl=self.ssl_context,
                    server_hostname=host if self.ssl_context else None,
                    limit=MAX_LINE), self.timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                failures.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            _keepalive(writer)
            writer.write(b"POST /v3/watch HTTP/1.1\r\nHost: %s:%d\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (host.encode(), port, len(body), body))
            try:
                await _within(_response_head(reader), self.timeout)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                writer.close()
                failures.append(f"{host}:{port}: {exc or type(exc).__name__}")
                continue
            except BaseException:
                writer.close()
                raise
            self._preferred = index
            return reader, writer
        raise Unreachable("no etcd endpoint reachable: " + "; ".join(failures))


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable` within `seconds` (TimeoutError past them).  Not
    asyncio.wait_for before Python 3.12: it loses a cancellation that comes
    as the awaitable completes, and a node's stop() would then wait forever
    for its watch."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)  # pragma: no cover - Python 3.10


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalives on a watch: a quiet watch sends nothing, so without
    them an etcd gone silently (a partition, a host powered off) would leave
    it waiting forever; with them the kernel breaks it after ~6 s."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 3), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):      # (Linux names; others keep their defaults)
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def _response_head(reader: asyncio.StreamReader) -> None:
    """Read a watch response's status line and headers: 200 and chunked,
    else `ProtocolError`."""
    status = await reader.readuntil(b"\r\n")
    parts = status.split(None, 2)
    headers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if len(parts) < 2 or parts[1] != b"200":
        raise ProtocolError(f"etcd: the watch was answered {status.strip()!r}")
    if headers.get("transfer-encoding") != "chunked":
        raise ProtocolError("etcd: the watch answer is not chunked")


async def _lines(reader: asyncio.StreamReader) -> AsyncGenerator[bytes, None]:
    """The newline-separated JSON messages of a chunked body (a message may
    span chunks, a chunk may hold several)."""
    pending = b""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise ProtocolError(f"etcd: bad chunk size {size_line[:40]!r}") from None
        if size == 0:
            return
        if len(pending) + size > MAX_LINE:
            raise ProtocolError("etcd: a watch message is too large")
        pending += await reader.readexactly(size)
        await reader.readexactly(2)
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
