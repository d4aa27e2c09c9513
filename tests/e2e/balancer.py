"""A TCP load balancer for tests: one loopback address in front of several backends, new connections round-robin
over the backends that accept (what a Kubernetes Service does for the pods behind it)."""

from __future__ import annotations

import socket
import threading
from collections import Counter


class TcpBalancer:
    """``TcpBalancer([port_a, port_b]).start()``; ``address`` is the one address clients use."""

    def __init__(self, backends: list[int], host: str = "127.0.0.1") -> None:
        self.backends, self.host = list(backends), host
        self.connections: Counter[int] = Counter()  # backend port -> connections forwarded
        self._next = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> TcpBalancer:
        threading.Thread(target=self._accept, name="balancer", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for s in list(self._open):
                s.close()

    def _connect(self) -> tuple[socket.socket, int] | None:
        for _ in range(len(self.backends)):
            with self._lock:
                port = self.backends[self._next % len(self.backends)]
                self._next += 1
            try:
                return socket.create_connection((self.host, port), timeout=5), port
            except OSError:
                continue  # that backend is down: the next one
        return None

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            picked = self._connect()
            if picked is None:
                client.close()
                continue
            backend, port = picked
            backend.settimeout(None)
            with self._lock:
                self.connections[port] += 1
                self._open.update((client, backend))
            for src, dst in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):  # either side gone: close both, as a proxy does
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
