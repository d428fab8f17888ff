"""The handlers of a Mongrel2 config database (config.sqlite), for `--mongrel2-db`.

Pure sqlite3 reading, no zmq: the broker then connects to what this returns.
`m2sh load` writes one `handler` row per distinct Handler (send_spec,
send_ident, recv_spec, recv_ident, protocol) and one `route` row per route
(path, host_id, target_id, target_type='handler' for handlers).

Mongrel2 *binds* the handler specs (docs/mongrel2.md "Sockets"), so a spec may name
an address one cannot connect to. Two translations make it connectable:
- a bind-all TCP host, `tcp://*:9997` or `tcp://0.0.0.0:9997`, becomes
  `tcp://127.0.0.1:9997` (the broker runs on the Mongrel2 host);
- a relative `ipc://run/send` is resolved against the database's directory,
  which is the directory Mongrel2 runs from (its chroot "./" is relative to
  it). Absolute and abstract (`ipc://@name`) ipc paths are kept as they are.

Selecting one handler (`--handler NAME`):
- NAME without "/" is a send_ident, matched exactly;
- NAME starting with "/" is a route path, matched exactly on any host;
- HOST/PATH is that route path on the host of that name.
No match, or several different handlers matching, is an error that lists the
handlers and their routes.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from scale0.errors import ConfigError

BIND_ALL_HOSTS = ("*", "0.0.0.0")
CONNECT_HOST = "127.0.0.1"


class M2DBError(ConfigError):
    """The database cannot be read or has no handler to serve; the message says which."""


@dataclass(frozen=True, slots=True)
class Handler:
    send_spec: str
    send_ident: str
    recv_spec: str
    recv_ident: str
    protocol: str
    routes: tuple[str, ...] = ()  # HOST/PATH of each route that leads to this handler

    def describe(self) -> str:
        routes = ", ".join(self.routes) or "no route"
        return f"{self.send_ident} ({self.send_spec} -> {self.recv_spec}; {routes})"


def read_handlers(db: str | Path) -> list[Handler]:
    """Every handler of `db`, specs as stored, in id order."""
    try:
        # mode=ro: a missing file is an error, not a new empty database.
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise M2DBError(f"{db}: cannot open the Mongrel2 config database: {exc}") from exc
    try:
        rows = conn.execute(
            "SELECT id, send_spec, send_ident, recv_spec, recv_ident, protocol "
            "FROM handler ORDER BY id").fetchall()
        routes = conn.execute(
            "SELECT route.target_id, host.name, route.path FROM route "
            "LEFT JOIN host ON host.id = route.host_id "
            "WHERE route.target_type = 'handler' ORDER BY route.id").fetchall()
    except sqlite3.Error as exc:
        raise M2DBError(f"{db}: not a readable Mongrel2 config database: {exc}") from exc
    finally:
        conn.close()
    by_id: dict[int, list[str]] = {}
    for target, host, path in routes:
        by_id.setdefault(target, []).append(f"{host or ''}{path}")
    return [Handler(str(send), str(ident or ""), str(recv), str(recv_ident or ""),
                    str(protocol or "json"), tuple(by_id.get(hid, ())))
            for hid, send, ident, recv, recv_ident, protocol in rows]


def select(handlers: list[Handler], name: str | None, source: str) -> list[Handler]:
    """The handlers `--handler NAME` designates (all when None); see the module doc."""
    if name is None:
        if not handlers:
            raise M2DBError(f"{source}: no handler in this Mongrel2 config database")
        return handlers
    if "/" not in name:
        found = [h for h in handlers if h.send_ident == name]
        what = f"send_ident {name!r}"
    else:
        host, _, path = name.partition("/")
        path = "/" + path
        found = [h for h in handlers
                 if any(_route_matches(route, host, path) for route in h.routes)]
        what = f"route {name!r}"
    distinct = _unique(found)
    listing = "; ".join(h.describe() for h in handlers) or "none"
    if not distinct:
        raise M2DBError(f"{source}: no handler with {what}; handlers: {listing}")
    if len(distinct) > 1:
        raise M2DBError(f"{source}: {what} leads to {len(distinct)} handlers: "
                        f"{'; '.join(h.describe() for h in distinct)}; "
                        "name one by send_ident or HOST/PATH")
    return distinct


def _route_matches(route: str, host: str, path: str) -> bool:
    route_host, _, route_path = route.partition("/")
    return "/" + route_path == path and (not host or host == route_host)


def connect_spec(spec: str, base: Path) -> str:
    """`spec` as a connecting peer must write it (see the module doc)."""
    scheme, sep, rest = spec.partition("://")
    if not sep:
        return spec
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if colon and host in BIND_ALL_HOSTS:
            return f"tcp://{CONNECT_HOST}:{port}"
    elif scheme == "ipc" and rest and not rest.startswith(("/", "@")):
        return f"ipc://{(base / rest).resolve()}"
    return spec


def links(db: str | Path, name: str | None = None) -> list[Handler]:
    """The selected handlers of `db` with connectable specs, duplicates removed."""
    base = Path(db).resolve().parent
    chosen = select(read_handlers(db), name, str(db))
    return _unique([Handler(connect_spec(h.send_spec, base), h.send_ident,
                            connect_spec(h.recv_spec, base), h.recv_ident, h.protocol,
                            h.routes) for h in chosen])


def _unique(handlers: list[Handler]) -> list[Handler]:
    """One per (send_spec, recv_spec, recv_ident): what the broker connects to."""
    seen: dict[tuple[str, str, str], Handler] = {}
    for h in handlers:
        seen.setdefault((h.send_spec, h.recv_spec, h.recv_ident), h)
    return list(seen.values())
