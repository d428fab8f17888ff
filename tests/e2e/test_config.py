"""Settings from a TOML file and SCALE0_* variables, and --mongrel2-db, on the real stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from .conftest import ROOT, SENDER, Proc, Stack, free_port

SCALE0 = [sys.executable, "-m", "scale0.cli"]


def start_broker(stack: Stack, name: str, *args: str,
                 env: dict[str, str] | None = None) -> Proc:
    """A broker started with exactly `args` (Stack.start_broker always adds --mongrel2)."""
    proc = Proc(name, [*SCALE0, "broker", *args], stack.tmp, env)
    stack.procs.append(proc)
    proc.wait_ready()
    return proc


def test_file_settings_apply_and_env_overrides_them(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    conf = s.tmp / "broker.toml"
    conf.write_text(f'bind = "{endpoint}"\nmongrel2 = ["{s.link}"]\n'
                    'route = ["/=cfgsvc"]\nmax_body = 100\n')
    first = start_broker(s, "broker-file", "--config", str(conf))
    s.broker_endpoints.append(endpoint)
    # The workers announce no route: "/" reaches them only through the file's route.
    s.start_pool("e2e_apps:app", service="cfgsvc", routes=())
    s.wait_ok("/")
    assert requests.post(s.url("/echo"), data=b"x" * 200, timeout=10).status_code == 413
    small = requests.post(s.url("/echo"), data=b"x" * 50, timeout=10)
    assert small.status_code == 200 and small.json()["length"] == 50
    assert first.stop() == 0

    # Same file, SCALE0_MAX_BODY wins over it; the workers reconnect to the same bind.
    start_broker(s, "broker-env", "--config", str(conf), env={"SCALE0_MAX_BODY": "1000"})
    s.wait_ok("/", timeout_s=30)
    big = requests.post(s.url("/echo"), data=b"x" * 200, timeout=10)
    assert big.status_code == 200 and big.json()["length"] == 200
    assert requests.post(s.url("/echo"), data=b"x" * 2000, timeout=10).status_code == 413


def test_broker_serves_the_handler_of_a_mongrel2_config_db(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    db = s.m2.runtime_dir / "config.sqlite"  # written by the real m2sh load
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    broker = start_broker(s, "broker-db", "--bind", endpoint, "--mongrel2-db", str(db),
                          "--handler", "/")
    s.broker_endpoints.append(endpoint)
    s.start_pool("e2e_apps:app", service="app", routes=("/",))
    assert s.wait_ok("/").status_code == 200
    assert requests.get(s.url("/"), timeout=10).status_code == 200
    assert f"serving Mongrel2 handler {SENDER} from {db}" in broker.log_tail(100_000)


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SCALE0, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                                           **(env or {})})


LINK = "tcp://127.0.0.1:1,tcp://127.0.0.1:2"


@pytest.mark.parametrize(("toml", "env", "message"), [
    (f'mongrel2 = ["{LINK}"]\nqueue_size = "abc"\n', {},
     "{file}: queue_size: expected an integer > 0, got 'abc'"),
    (f'mongrel2 = ["{LINK}"]\nqueu_size = 5\n', {},
     "{file}: unknown setting 'queu_size' (did you mean 'queue_size'?)"),
    (f'mongrel2 = ["{LINK}"]\n', {"SCALE0_REQUEST_TIMEOUT": "soon"},
     "environment SCALE0_REQUEST_TIMEOUT: expected a number > 0, got 'soon'"),
    ('mongrel2_db = "missing.sqlite"\n', {},
     "missing.sqlite: cannot open the Mongrel2 config database: unable to open database file"),
])
def test_bad_settings_exit_2_before_anything_starts(tmp_path: Path, toml: str,
                                                    env: dict[str, str], message: str) -> None:
    conf = tmp_path / "broker.toml"
    conf.write_text(toml + f'bind = "tcp://127.0.0.1:{free_port()}"\n')
    result = run_cli(tmp_path, "broker", "--config", str(conf), env=env)
    assert result.returncode == 2
    assert result.stderr == f"scale0 broker: error: {message.format(file=conf)}\n"
    assert result.stdout == ""  # no READY line: nothing was started


def test_wsgi_bad_file_value_exits_2(tmp_path: Path) -> None:
    conf = tmp_path / "wsgi.toml"
    conf.write_text('app = "e2e_apps:app"\nconnect = ["tcp://127.0.0.1:1"]\nthreads = 0\n')
    result = run_cli(tmp_path, "wsgi", "--config", str(conf))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"scale0 wsgi: error: {conf}: threads: expected an integer > 0, "
                             "got 0\n")
