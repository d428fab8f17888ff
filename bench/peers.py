"""The peers Scale0 is measured against: nginx -> gunicorn and nginx -> granian
(WSGI); nginx -> uvicorn and nginx -> granian --interface asgi (ASGI).

Both serve the same `examples.hello:app` WSGI app as the Scale0 pools, from
the repository root, on free loopback ports:

- gunicorn: `-w 2 -k sync` (two sync workers, gunicorn's default worker
  class), `--no-control-socket` where the installed gunicorn has that flag.
- granian: `--interface wsgi --workers 2 --no-ws`.
- uvicorn: `--workers 2 --no-access-log --ws websockets` and granian
  `--interface asgi --workers 2`, both serving `examples.asgi_hello:app`; their
  nginx also has a `location /ws` passing WebSocket upgrades through.
- nginx in front of each: `worker_processes auto`, a plain
  `proxy_pass http://127.0.0.1:PORT;` (nginx's defaults: HTTP/1.0 to the
  upstream, a new upstream connection per request, response buffering),
  `keepalive_requests 1000000` towards the client, its own pid, temp and log
  paths in the bench's temp folder, in the foreground (`daemon off`).
  nginx keeps its default access log (to the temp folder), as Mongrel2 keeps
  its own.

nginx is Debian's package (`apt-get install nginx`); gunicorn and granian come
from PyPI (`pip install -e '.[bench]'`, which `make bench` runs).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from .procs import BenchError, Proc, free_port
from .scenarios import ROOT, Scenario

APP = "examples.hello:app"
ASGI_APP = "examples.asgi_hello:app"
WORKERS = 2
NGINX_TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None)
    if found is None:
        raise BenchError("nginx not found: install it with `apt-get install nginx` "
                         "(`make bench` does that when run as root)")
    return found


def _venv_tool(name: str) -> str:
    """A console script next to this Python (the .venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found: install the bench extras with "
                         f"`{sys.executable} -m pip install -e '.[bench]'` (`make bench` does)")
    return found


def require_peers() -> None:
    nginx_binary()
    _venv_tool("gunicorn")
    _venv_tool("granian")


def require_asgi_peers() -> None:
    nginx_binary()
    _venv_tool("uvicorn")
    _venv_tool("granian")


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def gunicorn_has_no_control_socket() -> bool:
    return "--no-control-socket" in _output([_venv_tool("gunicorn"), "--help"])


def versions() -> list[tuple[str, str]]:
    nginx = _output([nginx_binary(), "-v"]).rpartition("/")[2] or "unknown"
    dpkg = _output(["dpkg-query", "-W", "-f", "${Version}", "nginx"])
    gunicorn = _output([_venv_tool("gunicorn"), "--version"]).removeprefix("gunicorn ")
    granian = _output([_venv_tool("granian"), "--version"]).removeprefix("granian ")
    uvicorn = _output([_venv_tool("uvicorn"), "--version"]).split(" with ")[0]
    return [("uvicorn", uvicorn.removeprefix("Running uvicorn ") or "unknown"),
            ("nginx", nginx + (f" (Debian {dpkg})" if dpkg else "")),
            ("gunicorn", gunicorn.strip("()").removeprefix("version ") or "unknown"),
            ("granian", granian or "unknown")]


# `websocket`: a `location /ws` that passes WebSocket upgrades through
# (HTTP/1.1 upstream with the Upgrade and Connection headers, nginx's own recipe).
WS_LOCATION = """\
        location /ws {{
            proxy_pass http://127.0.0.1:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 300s;
        }}
"""


def nginx_conf(prefix: Path, port: int, upstream_port: int, websocket: bool = False) -> str:
    ws = WS_LOCATION.format(upstream_port=upstream_port) if websocket else ""
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in NGINX_TEMP_DIRS)
    return f"""\
worker_processes auto;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log {prefix / "access.log"};
{temp}
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
{ws}        location / {{
            proxy_pass http://127.0.0.1:{upstream_port};
        }}
    }}
}}
"""


def _start_nginx(scenario: Scenario, tmp: Path, upstream_port: int,
                 websocket: bool = False) -> None:
    prefix = tmp / "nginx"
    for kind in NGINX_TEMP_DIRS:
        (prefix / kind).mkdir(parents=True, exist_ok=True)
    # As root nginx's workers run as `nobody`: they must reach the temp paths
    # (a 1 MiB reply is buffered there, as with any nginx proxying by default),
    # so the folders above them must be searchable (bench.run opens its own).
    for folder in (tmp, prefix):
        folder.chmod(0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, scenario.http_port, upstream_port, websocket))
    argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise BenchError(f"nginx rejects {conf}:\n{check.stderr.strip()}")
    scenario.procs.append(Proc("nginx", argv, prefix, tmp, stop_signal=signal.SIGTERM,
                               extra_logs=(prefix / "error.log",), child_role="nginx worker"))


def _start_peer(tmp: Path, name: str, process: str, argv: list[str],
                websocket: bool = False) -> Scenario:
    """nginx -> `argv` (a server of WORKERS processes named `process`) on a
    free upstream port; every peer starts, and is waited for, this way."""
    tmp.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(name, free_port())
    try:
        upstream = free_port()
        argv = [part.replace("{port}", str(upstream)) for part in argv]
        scenario.procs.append(Proc(process, argv, ROOT, tmp, child_role=f"{process} worker"))
        _start_nginx(scenario, tmp, upstream, websocket=websocket)
        scenario.wait_ready()
        scenario.wait_children(process, WORKERS)
    except BaseException:
        scenario.stop()
        raise
    return scenario


def start_gunicorn(tmp: Path) -> Scenario:
    """nginx -> gunicorn, WORKERS sync workers, serving APP."""
    argv = [_venv_tool("gunicorn"), "-w", str(WORKERS), "-k", "sync", "-b", "127.0.0.1:{port}"]
    if gunicorn_has_no_control_socket():
        argv.append("--no-control-socket")
    return _start_peer(tmp, "gunicorn", "gunicorn", [*argv, APP])


def start_granian(tmp: Path) -> Scenario:
    """nginx -> granian --interface wsgi, WORKERS workers, serving APP."""
    return _start_peer(tmp, "granian", "granian", [
        _venv_tool("granian"), "--interface", "wsgi", "--workers", str(WORKERS),
        "--no-ws", "--host", "127.0.0.1", "--port", "{port}", APP])


def start_uvicorn(tmp: Path) -> Scenario:
    """nginx -> uvicorn --workers 2 serving ASGI_APP (HTTP and the /ws echo)."""
    return _start_peer(tmp, "uvicorn", "uvicorn", [
        _venv_tool("uvicorn"), "--workers", str(WORKERS), "--host", "127.0.0.1",
        "--port", "{port}", "--no-access-log", "--ws", "websockets", ASGI_APP], websocket=True)


def start_granian_asgi(tmp: Path) -> Scenario:
    """nginx -> granian --interface asgi --workers 2 serving ASGI_APP."""
    return _start_peer(tmp, "granian asgi", "granian", [
        _venv_tool("granian"), "--interface", "asgi", "--workers", str(WORKERS),
        "--host", "127.0.0.1", "--port", "{port}", ASGI_APP], websocket=True)
