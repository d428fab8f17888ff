"""Mongrel2 helpers for the tests and the benchmarks, not part of the package.

`config_text` writes the one-server m2sh config the end-to-end tests and
`make bench` run Mongrel2 with; `cancel_reply` builds the ctl reply that
closes connections at once (Mongrel2's ``["ctl", {"cancel": true}]``), which
the broker never sends.
"""

from __future__ import annotations

from collections.abc import Sequence

from scale0.wire.mongrel2_reply import ctl_reply

# limits.buffer_size: the request line and all header lines must fit in it,
# else Mongrel2 answers 400 (Mongrel2's default 4096 refuses an 8 KB cookie).
# 16 KiB holds gunicorn's largest field (8190 bytes) and the usual rest; each
# connection allocates it, resident once filled (docs/operating.md). It must
# not exceed limits.content_length: Mongrel2 1.12 then corrupts spooled
# uploads (measured with 32768 and the default 20480: bytes from 20316 on).
HEADER_BUFFER_BYTES = 16384


def config_text(*, http_port: int, send_spec: str, recv_spec: str, send_ident: str,
                uuid: str = "f400bf85-4538-4f7a-8908-67e313d515c2", bind_addr: str = "127.0.0.1",
                content_length_limit: int = 20480, recv_ident: str = "",
                settings: dict[str, int] | None = None, flow_control: bool = True) -> str:
    """A one-server, one-handler m2sh config routing every path to Scale0.
    `settings` add to (or replace) the Mongrel2 settings written here."""
    settings = {"limits.buffer_size": HEADER_BUFFER_BYTES, **(settings or {})}
    if settings["limits.buffer_size"] > content_length_limit:
        raise ValueError("limits.buffer_size over limits.content_length corrupts Mongrel2 "
                         "uploads")
    extra = "".join(f',\n    "{key}": {value}' for key, value in settings.items())
    return f"""\
scale0 = Handler(send_spec='{send_spec}', send_ident='{send_ident}',
                 recv_spec='{recv_spec}', recv_ident='{recv_ident}', protocol='tnetstring')

main = Server(
    uuid="{uuid}", access_log="/logs/access.log", error_log="/logs/error.log",
    chroot="./", pid_file="/run/mongrel2.pid", default_host="localhost",
    name="main", bind_addr="{bind_addr}", port={http_port},
    hosts=[Host(name="localhost", routes={{'/': scale0}})])

settings = {{
    "upload.temp_store": "uploads/upload.XXXXXX",
    "server.daemonize": 0,
    "download.flow_control": {int(flow_control)},
    "limits.content_length": {content_length_limit}{extra}
}}
servers = [main]
"""


def cancel_reply(sender: bytes, conn_ids: int | Sequence[int]) -> bytes:
    """Close `conn_ids` at once."""
    return ctl_reply(sender, conn_ids, {b"cancel": True})
