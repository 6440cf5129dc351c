"""The listening sockets: strangers' connections accepted a few at a time,
and refused before anything is made for them (DESIGN.md "Identity and
authorization", bounded unauthenticated load).

`loop.create_server` accepts every connection waiting in the backlog in one
callback, and makes a transport and a protocol for each before it can be
refused: under a flood, a legitimate peer's frame waited behind a whole
batch of such refusals (up to 85 in one callback, about 64 us each, in the
hostile-peer flood of tests/flood.py).  Here the node accepts itself:

* at most `ACCEPT_BATCH` connections per turn of the event loop, so that
  what else is ready (the legitimate calls) runs in between;
* a connection from a throttled address, or one past
  `max_pending_handshakes`, is closed as the bare descriptor it was
  accepted as -- no socket object, transport, `Connection` or core
  protocol, not one byte read;
* one admitted is pending from accept on, so under TLS its TLS handshake is
  counted too (the protocol is made, as asyncio does, before the TLS
  handshake; one whose TLS handshake fails is told so, as lost).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from malla.guard import HandshakeThrottle
from malla.handshakes import PendingHandshakes

__all__ = ["ACCEPT_BATCH", "Acceptor"]

log = logging.getLogger("malla.acceptor")

# Connections accepted per turn of the loop.  A refused one costs some 25 us
# of CPU (most of it the kernel's accept and close), an admitted one far more
# (its socket, transport, Connection and core protocol, then whatever it sends
# -- in that turn or the next): a call arriving meanwhile waits behind the
# whole batch, so it is small.  The loop turns again at once while more are
# waiting, so the pace of accepting hardly falls.
ACCEPT_BATCH = 4
BACKLOG = 100                   # asyncio's create_server default
# After EMFILE and the like: stop accepting for a while (asyncio does too)
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# A TLS handshake cut short by the dialler closing: no failure of its own
_GAVE_UP = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError)

# The protocol for an admitted stranger, told its key in PendingHandshakes
Factory = Callable[[int], Any]


class Acceptor:
    """The node's listening sockets and the strangers' connections on them
    not yet handed to a protocol."""

    def __init__(self, factory: Factory, pending: PendingHandshakes,
                 throttle: HandshakeThrottle, tls: ssl.SSLContext | None,
                 tls_timeout: float) -> None:
        self._factory = factory
        self._pending = pending
        self._throttle = throttle
        self._tls = tls
        # (asyncio's own default is 60 s: a TLS handshake is bounded by
        # handshake_timeout like the node's own)
        self._tls_timeout = tls_timeout
        self._socks: list[socket.socket] = []
        self._family: dict[socket.socket, int] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._socks)

    async def listen(self, host: str | None, port: int) -> None:
        """Bind and listen on every address `host` resolves to, as
        asyncio's create_server does (SO_REUSEADDR; IPv6 sockets IPv6 only)."""
        loop = self._loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                       type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError as exc:
                    # (a kernel without IPv6 still resolves "" to "::":
                    # asyncio skips such a family too, and so does this)
                    log.debug("malla: no socket of family %s here: %s", family, exc)
                    continue
                self._socks.append(sock)
                self._family[sock] = family
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:      # (asyncio's words: the address is in them)
                    why = (exc.strerror or str(exc)).lower()
                    raise OSError(exc.errno, f"error while attempting to bind on address "
                                             f"{address!r}: {why}") from None
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        if not self._socks:
            raise OSError(errno.EAFNOSUPPORT, f"no address of {host!r} can be listened on here")
        for sock in self._socks:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening; connections still in their TLS handshake close too."""
        for sock in self._socks:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()
        self._family.clear()
        for task in self._starting:
            task.cancel()

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                # (the descriptor alone: a refused one never costs a socket
                # object, whose making asks the kernel its address again)
                fd, address = listening._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue                # gone before we took it
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # out of descriptors or memory: take a breath, as asyncio does
                    log.error("malla: accepting a connection failed: %s; accepting again "
                              "in %.0f s", exc, ACCEPT_RETRY_DELAY)
                    self._pause(listening)
                    return
                # (anything else belongs to that one connection: ECONNRESET,
                # EPROTO, a firewall's EPERM... -- the next one may be fine)
                self._pending.warn("malla: accepting a connection failed: %s", exc)
                continue
            host = str(address[0])
            key = None if self._throttle.blocked(host) else self._pending.start(host)
            if key is None:
                # (counted and logged by the throttle or the bound)
                os.close(fd)
                continue
            sock = socket.socket(self._family[listening], socket.SOCK_STREAM,
                                 socket.IPPROTO_TCP, fd)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:             # (reset already, on some kernels)
                self._pending.end(key)
                sock.close()
                continue
            task = asyncio.ensure_future(self._start(sock, key, host))
            self._starting.add(task)
            task.add_done_callback(functools.partial(self._started, sock, key))

    def _started(self, sock: socket.socket, key: Any, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        if task.cancelled():
            # (close() in the turn it was accepted: a task cancelled before
            # its first step never ran its own clean-up, so its slot and its
            # socket would stay taken; ending either twice is harmless)
            self._pending.end(key)
            sock.close()

    def _pause(self, listening: socket.socket) -> None:
        assert self._loop is not None
        self._loop.remove_reader(listening.fileno())

        def resume() -> None:
            if listening.fileno() >= 0:
                assert self._loop is not None
                self._loop.add_reader(listening.fileno(), self._accept, listening)

        self._loop.call_later(ACCEPT_RETRY_DELAY, resume)

    async def _start(self, sock: socket.socket, key: int, host: str) -> None:
        """Hand the admitted connection to its protocol (after the TLS
        handshake, under TLS)."""
        assert self._loop is not None
        made: Any = None

        def factory() -> Any:
            nonlocal made
            made = self._factory(key)
            return made

        try:
            await self._loop.connect_accepted_socket(
                factory, sock, ssl=self._tls,
                ssl_handshake_timeout=self._tls_timeout if self._tls is not None else None)
        except BaseException as exc:
            # The TLS handshake failed or timed out (ssl.SSLError is an
            # OSError), or the node stopped: the socket is the loop's now (it
            # closed it), and the protocol, made but never connected, is told
            # it is lost -- so the connection is no longer pending
            self._pending.end(key)
            if made is not None and made.transport is None and not made.closed:
                made.connection_lost(exc if isinstance(exc, Exception) else None)
            if not isinstance(exc, (OSError, asyncio.TimeoutError)):
                raise
            if isinstance(exc, _GAVE_UP):
                return      # (a dialler that went away, as a plain one may: not counted)
            # a failed handshake like any other (counted, the address throttled,
            # logged at a bounded rate): garbage sent to a TLS port included
            self._throttle.failed(host)
            self._pending.warn("malla: TLS handshake from %s failed: %s", host,
                               str(exc) or type(exc).__name__)
