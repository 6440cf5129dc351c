"""The UDP heartbeat thread: liveness that does not need the event loop."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from malla.guard import accepted_cookies

if TYPE_CHECKING:
    from malla.liveness import Liveness

__all__ = ["HeartbeatThread"]


class HeartbeatThread:
    """Heartbeats that do not need the event loop: a daemon thread with its
    own UDP socket sends a datagram to every peer each interval and feeds
    `Liveness` with what it receives.  A handler blocking the loop does not
    stop it, so peers do not mistake a busy node for a dead one; a stopped
    process or a partition silences it, and is still detected.

    Datagram: name length (1 byte), name, incarnation (u64), sequence
    (u64), then the first 16 bytes of HMAC-SHA256(cookie, label + all
    before), keyed by the node's first cookie.  A receiver accepts it only
    with a MAC under one of the cookies it accepts (during a rotation,
    ``cookie=[first, other]``), from a known peer of that incarnation, with
    a sequence above the last one seen (no replay).
    """

    LABEL = b"malla-v1 udp heartbeat"

    def __init__(self, name: str, incarnation: int, cookie: bytes, host: str,
                 interval: float, liveness: Liveness) -> None:
        import socket
        import threading

        self.name = name
        self.incarnation = incarnation
        self._cookies = accepted_cookies(cookie)
        self._interval = interval
        self._liveness = liveness
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(min(interval, 0.2))
        self.port: int = self._sock.getsockname()[1]
        # name -> (address, incarnation): replaced whole, read by the thread
        self._targets: dict[str, tuple[tuple[str, int], int]] = {}
        self._last_seq: dict[str, int] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"malla-heartbeat-{name}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def add(self, peer: str, address: tuple[str, int], incarnation: int) -> None:
        targets = dict(self._targets)
        targets[peer] = (address, incarnation)
        self._targets = targets
        self._last_seq.pop(peer, None)

    def remove(self, peer: str) -> None:
        targets = dict(self._targets)
        targets.pop(peer, None)
        self._targets = targets

    def _mac(self, cookie: bytes, body: bytes) -> bytes:
        import hashlib
        import hmac
        return hmac.new(cookie, self.LABEL + body, hashlib.sha256).digest()[:16]

    def _authentic(self, body: bytes, mac: bytes) -> bool:
        """The MAC is under one of our cookies; each compared in constant
        time, with no early exit."""
        import hmac
        if len(mac) != 16:
            return False
        ok = False
        for cookie in self._cookies:
            ok |= hmac.compare_digest(mac, self._mac(cookie, body))
        return ok

    def _datagram(self) -> bytes:
        self._seq += 1
        raw = self.name.encode()
        body = (bytes([len(raw)]) + raw + self.incarnation.to_bytes(8, "big")
                + self._seq.to_bytes(8, "big"))
        return body + self._mac(self._cookies[0], body)

    def _run(self) -> None:
        next_send = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                next_send = now + self._interval
                data = self._datagram()
                for address, _ in list(self._targets.values()):
                    try:
                        self._sock.sendto(data, address)
                    except OSError:
                        pass   # unreachable now: that is what liveness is for
            try:
                data, _ = self._sock.recvfrom(512)
            except OSError:
                continue
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        if len(data) < 1 + 16 + 16:
            return
        n = data[0]
        body, mac = data[:1 + n + 16], data[1 + n + 16:]
        if len(body) != 1 + n + 16 or not self._authentic(body, mac):
            return
        try:
            peer = body[1:1 + n].decode()
        except UnicodeDecodeError:
            return
        incarnation = int.from_bytes(body[1 + n:9 + n], "big")
        seq = int.from_bytes(body[9 + n:17 + n], "big")
        target = self._targets.get(peer)
        if target is None or target[1] != incarnation or seq <= self._last_seq.get(peer, 0):
            return
        self._last_seq[peer] = seq
        self._liveness.heard(peer)
