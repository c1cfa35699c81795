"""A small TCP fault proxy for tests: loopback only, threads, bounded in time.

``FaultProxy(upstream_port)`` listens on a free loopback port and forwards each
connection to ``127.0.0.1:upstream_port``. Faults, settable at any time:

- ``drop_after_down`` / ``drop_after_up``: cut a connection once it has carried that
  many bytes from the server (down) or to it (up), exactly at that byte;
- ``drop_first``: cut only the first K connections opened since the proxy started or
  was last ``heal``ed (None: every one, including those already open);
- ``reset``: cut with a TCP reset (SO_LINGER 0) instead of a clean close;
- ``delay``: seconds to sleep before forwarding each chunk of ``chunk`` bytes down
  (a slow link: ``chunk / delay`` bytes/s per connection);
- ``refuse``: close every new connection at once;
- ``damage_up_at``: flip the bits of the byte at that offset of every connection's
  bytes to the server (damage on the wire that TCP did not catch), counted in ``damaged``;
- ``drop_range``: rename requests' ``Range`` header (to ``X-Nop``, same length), as a
  proxy that does not pass it on: the server answers with the whole file.

It counts connections, cuts, bytes each way, and the ``Range: bytes=N-`` offsets of
the requests it forwarded (``ranges``), so a test can tell that a download resumed.
Every socket has a timeout and ``close()`` shuts everything; threads are daemons.
"""

from __future__ import annotations

import re
import socket
import struct
import threading

_RANGE = re.compile(rb"\r\nrange: *bytes=(\d+)-", re.IGNORECASE)
_RANGE_NAME = re.compile(rb"\r\nrange:", re.IGNORECASE)
IO_TIMEOUT = 30.0  # no test waits longer than this on a silent socket


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.drop_after_down: int | None = None
        self.drop_after_up: int | None = None
        self.drop_first: int | None = None
        self.reset = False
        self.delay = 0.0
        self.chunk = 64 * 1024
        self.refuse = False
        self.damage_up_at: int | None = None
        self.damaged = 0
        self.drop_range = False
        self.connections = 0
        self.cuts = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.ranges: list[int] = []
        self._base = 0  # connection index that drop_first counts from
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    def heal(self) -> None:
        """No more faults from now on (counters are kept)."""
        self.drop_after_down = self.drop_after_up = self.drop_first = None
        self.delay = 0.0
        self.refuse = False
        self.damage_up_at = None
        self._base = self.connections

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _close(s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plumbing -----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if self.refuse:
                _close(client, reset=True)
                continue
            with self._lock:
                index = self.connections
                self.connections += 1
            threading.Thread(target=self._serve, args=(client, index), name=f"faultproxy-{index}", daemon=True).start()

    def _cut(self, index: int, direction: str) -> int | None:
        """After how many bytes this connection is cut in ``direction`` (None: never)."""
        if self.drop_first is not None and not 0 <= index - self._base < self.drop_first:
            return None
        return self.drop_after_down if direction == "down" else self.drop_after_up

    def _serve(self, client: socket.socket, index: int) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=IO_TIMEOUT)
        except OSError:
            _close(client, reset=True)
            return
        client.settimeout(IO_TIMEOUT)
        with self._lock:
            self._socks.update((client, server))
        conn = _Connection(client, server)
        up = threading.Thread(target=self._pump, args=(conn, client, server, "up", index), daemon=True)
        up.start()
        self._pump(conn, server, client, "down", index)
        up.join(IO_TIMEOUT)
        with self._lock:
            self._socks.difference_update((client, server))

    def _pump(self, conn: "_Connection", src: socket.socket, dst: socket.socket, direction: str, index: int) -> None:
        carried = 0
        try:
            while not conn.closed:
                limit = self._cut(index, direction)
                want = self.chunk if limit is None else max(0, min(self.chunk, limit - carried))
                if limit is not None and want == 0:
                    with self._lock:
                        self.cuts += 1
                    conn.close(reset=self.reset)
                    return
                if direction == "down" and self.delay:
                    self._stop.wait(self.delay)
                data = src.recv(want)
                if not data:
                    conn.close()
                    return
                if direction == "up":
                    self.ranges.extend(int(m.group(1)) for m in _RANGE.finditer(data))
                    if self.drop_range:
                        data = _RANGE_NAME.sub(b"\r\nX-Nop:", data)
                    at = self.damage_up_at
                    if at is not None and carried <= at < carried + len(data):
                        data = bytearray(data)
                        data[at - carried] ^= 0xFF
                        with self._lock:
                            self.damaged += 1
                dst.sendall(data)
                carried += len(data)
                with self._lock:
                    if direction == "down":
                        self.bytes_down += len(data)
                    else:
                        self.bytes_up += len(data)
        except OSError:
            conn.close()


class _Connection:
    """Both sockets of one proxied connection, closed once, together."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.closed = False
        self._lock = threading.Lock()

    def close(self, reset: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        _close(self.client, reset)
        _close(self.server, reset)


def _close(sock: socket.socket, reset: bool = False) -> None:
    try:
        if reset:  # RST instead of FIN: the peer sees "connection reset by peer"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
