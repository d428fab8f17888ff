"""A small TLS-terminating proxy for the tests: what a load balancer does.

It accepts TLS on 127.0.0.1, reads each request head, drops the client's own
X-Forwarded-Proto and X-Real-IP, adds ``X-Forwarded-Proto: https`` and
``X-Real-IP: <client address>``, and forwards to Mongrel2 over plain TCP
(from `source_ip`, so a test can make the front an untrusted peer). One
request per connection (it adds ``Connection: close``). Threads, stopped by
`close()`; the certificate is tests/fixtures/tls (self-signed, 127.0.0.1).
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

TLS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tls"
CERT = TLS_DIR / "front.crt"
_DROPPED = (b"x-forwarded-proto", b"x-real-ip", b"connection")


class TlsFront:
    def __init__(self, upstream_port: int, source_ip: str = "127.0.0.1") -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.source_ip = source_ip
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(CERT, TLS_DIR / "front.key")
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def __enter__(self) -> TlsFront:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        self.listener.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, (client_ip, _) = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn, client_ip), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket, client_ip: str) -> None:
        raw.settimeout(10)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                head, rest = _read_head(tls)
                if head is None:
                    return
                with socket.create_connection(self.upstream, timeout=10,
                                              source_address=(self.source_ip, 0)) as up:
                    up.sendall(_rewrite(head, client_ip) + rest)
                    _pump_body(tls, up, head, len(rest))
                    while data := up.recv(65536):
                        tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass  # a client that went away: nothing to report


def _read_head(sock: ssl.SSLSocket) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _rewrite(head: bytes, client_ip: str) -> bytes:
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:]
                         if line.split(b":", 1)[0].strip().lower() not in _DROPPED]
    kept += [b"X-Forwarded-Proto: https", b"X-Real-IP: " + client_ip.encode(),
             b"Connection: close"]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def _pump_body(tls: ssl.SSLSocket, up: socket.socket, head: bytes, have: int) -> None:
    """Forward the rest of a Content-Length body (the tests send no other kind)."""
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while have < length:
        chunk = tls.recv(65536)
        if not chunk:
            return
        up.sendall(chunk)
        have += len(chunk)
