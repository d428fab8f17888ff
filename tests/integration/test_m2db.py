"""scale0/deploy/m2db.py against config.sqlite files made by the real `m2sh load`."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from scale0.deploy import m2db
from scale0.deploy.m2db import Handler, M2DBError

ROOT = Path(__file__).resolve().parents[2]

TWO_HANDLERS = """\
a = Handler(send_spec='tcp://*:9997', send_ident='aaaa-0001', recv_spec='tcp://0.0.0.0:9996',
            recv_ident='', protocol='tnetstring')
b = Handler(send_spec='ipc://run/b-send', send_ident='bbbb-0002',
            recv_spec='ipc:///tmp/scale0-b-recv', recv_ident='bb', protocol='json')
main = Server(uuid="f400bf85-4538-4f7a-8908-67e313d515c2", access_log="/logs/access.log",
    error_log="/logs/error.log", chroot="./", pid_file="/run/mongrel2.pid",
    default_host="localhost", name="main", bind_addr="127.0.0.1", port=6767,
    hosts=[Host(name="localhost", routes={'/': a, '/api': b, '/api2': b}),
           Host(name="example.com", routes={'/': b})])
servers = [main]
"""


def m2sh_load(folder: Path, conf_text: str) -> Path:
    if shutil.which("m2sh") is None:
        pytest.fail("m2sh is not installed: run `make test` (installs mongrel2-core)")
    (folder / "mongrel2.conf").write_text(conf_text)
    result = subprocess.run(["m2sh", "load", "-config", "mongrel2.conf", "-db", "config.sqlite"],
                            cwd=folder, env={**os.environ, "LOGNAME": "scale0"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return folder / "config.sqlite"


@pytest.fixture(scope="module")
def shipped_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    conf = (ROOT / "mongrel2" / "mongrel2.conf").read_text()
    return m2sh_load(tmp_path_factory.mktemp("shipped"), conf)


@pytest.fixture(scope="module")
def two_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return m2sh_load(tmp_path_factory.mktemp("two"), TWO_HANDLERS)


def test_shipped_config(shipped_db: Path) -> None:
    assert m2db.links(shipped_db) == [Handler(
        "tcp://127.0.0.1:9997", "5ca1e000-0000-4000-8000-000000000001", "tcp://127.0.0.1:9996",
        "", "tnetstring", ("localhost/",))]
    # Every way of naming that one handler selects it.
    for name in ("5ca1e000-0000-4000-8000-000000000001", "/", "localhost/"):
        assert [h.send_ident for h in m2db.links(shipped_db, name)] == [
            "5ca1e000-0000-4000-8000-000000000001"]


def test_read_handlers_keeps_the_specs_as_stored(two_db: Path) -> None:
    a, b = m2db.read_handlers(two_db)
    assert (a.send_spec, a.recv_spec, a.routes) == ("tcp://*:9997", "tcp://0.0.0.0:9996",
                                                    ("localhost/",))
    assert (b.send_spec, b.recv_ident, b.protocol) == ("ipc://run/b-send", "bb", "json")
    assert b.routes == ("localhost/api", "localhost/api2", "example.com/")


def test_all_handlers_become_links_with_connectable_specs(two_db: Path) -> None:
    a, b = m2db.links(two_db)
    assert (a.send_spec, a.recv_spec) == ("tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996")
    # relative ipc: against the database's folder; absolute ipc: kept.
    assert b.send_spec == f"ipc://{two_db.parent.resolve()}/run/b-send"
    assert b.recv_spec == "ipc:///tmp/scale0-b-recv"


@pytest.mark.parametrize(("name", "ident"), [
    ("aaaa-0001", "aaaa-0001"),
    ("bbbb-0002", "bbbb-0002"),
    ("/api", "bbbb-0002"),
    ("/api2", "bbbb-0002"),
    ("localhost/", "aaaa-0001"),
    ("example.com/", "bbbb-0002"),
])
def test_handler_by_send_ident_or_route(two_db: Path, name: str, ident: str) -> None:
    assert [h.send_ident for h in m2db.links(two_db, name)] == [ident]


def test_ambiguous_route_lists_the_candidates(two_db: Path) -> None:
    with pytest.raises(M2DBError) as err:
        m2db.links(two_db, "/")
    text = str(err.value)
    assert text.startswith(f"{two_db}: route '/' leads to 2 handlers: aaaa-0001 ")
    assert "bbbb-0002" in text and "name one by send_ident or HOST/PATH" in text


@pytest.mark.parametrize(("name", "what"), [
    ("nope", "send_ident 'nope'"),
    ("/nope", "route '/nope'"),
    ("example.com/api", "route 'example.com/api'"),
])
def test_no_match_lists_the_handlers(two_db: Path, name: str, what: str) -> None:
    with pytest.raises(M2DBError, match=re.escape(f"{two_db}: no handler with {what}; "
                                                  "handlers: aaaa-0001 (tcp://*:9997")):
        m2db.links(two_db, name)


def test_missing_unreadable_or_empty_database(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite"
    with pytest.raises(M2DBError, match=re.escape(f"{missing}: cannot open")):
        m2db.links(missing)
    assert not missing.exists()  # read-only: no empty database left behind
    text = tmp_path / "mongrel2.conf"
    text.write_text("not a database\n" * 100)
    with pytest.raises(M2DBError, match="not a readable Mongrel2 config database"):
        m2db.links(text)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(M2DBError, match="no such table: handler"):
        m2db.links(other)


def test_database_without_handlers(tmp_path: Path) -> None:
    db = m2sh_load(tmp_path, TWO_HANDLERS)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM handler")
    conn.close()
    with pytest.raises(M2DBError, match=re.escape(f"{db}: no handler in this Mongrel2")):
        m2db.links(db)


@pytest.mark.parametrize(("spec", "expected"), [
    ("tcp://*:1", "tcp://127.0.0.1:1"),
    ("tcp://0.0.0.0:1", "tcp://127.0.0.1:1"),
    ("tcp://10.0.0.5:1", "tcp://10.0.0.5:1"),
    ("ipc://run/x", "ipc:///srv/m2/run/x"),
    ("ipc:///abs/x", "ipc:///abs/x"),
    ("ipc://@abstract", "ipc://@abstract"),
    ("inproc://x", "inproc://x"),
])
def test_connect_spec(spec: str, expected: str) -> None:
    assert m2db.connect_spec(spec, Path("/srv/m2")) == expected
