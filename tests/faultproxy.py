"""A fault-injecting TCP proxy for the tests: sits between a client and a server on 127.0.0.1 and
drops connections mid-transfer, delays traffic, or refuses everything. Bounded: it forwards only
between the two loopback endpoints and stops when told."""

from __future__ import annotations

import socket
import struct
import threading
import time


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; faults are set through the attributes below."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.drop_after = 0          # reset a connection once it has carried this many bytes (0: never)
        self.drops_left = 0          # how many connections may still be reset that way
        self.delay = 0.0             # seconds added before forwarding each chunk
        self.refuse = False          # reset every new connection at once
        self.dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            if self.refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(client)
                continue
            state = {"bytes": 0, "doomed": False}
            with self._lock:
                if self.drops_left > 0 and self.drop_after:
                    self.drops_left -= 1
                    state["doomed"] = True
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, client, upstream, state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client, upstream, state: dict) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(16384)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                state["bytes"] += len(data)
                if state["doomed"] and state["bytes"] >= self.drop_after:
                    with self._lock:
                        self.dropped += not state.get("cut")
                        state["cut"] = True
                    break
                dst.sendall(data)
        except OSError:
            pass
        _reset(client)
        _reset(upstream)

    def stop(self) -> None:
        self._stop.set()
        self._server.close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a dropped link would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
