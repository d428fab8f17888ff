"""The access log on the real stack: one line per request, in the chosen format."""

from __future__ import annotations

import requests

from .conftest import Stack, wait_for


def test_access_log_has_a_line_per_request_with_status_service_and_worker(
        fresh_stack: Stack) -> None:
    log = fresh_stack.tmp / "access.log"
    fresh_stack.start_mongrel2()
    fresh_stack.start_broker("--access-log", str(log), "--access-log-format",
                             "{conn_id} {method} {path} {status} {bytes_out} {service} "
                             "{worker} {duration_ms:.3f}")
    fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/app",))
    fresh_stack.wait_ok("/app/echo")
    assert requests.get(fresh_stack.url("/app/echo?x=1"), timeout=10).status_code == 200
    assert requests.post(fresh_stack.url("/app/echo"), data=b"abc", timeout=10).ok
    assert requests.get(fresh_stack.url("/nowhere"), timeout=10).status_code == 404

    def lines() -> list[list[str]]:
        found = [line.split(" ") for line in log.read_text().splitlines()] if log.exists() else []
        return found if any(f[2] == "/nowhere" for f in found) else []

    rows = wait_for(lines, what="the access log lines")
    by_path = {(row[1], row[2]): row for row in rows}
    get = by_path["GET", "/app/echo?x=1"]
    assert get[3] == "200" and int(get[4]) > 0 and get[5] == "app" and get[6] != "-"
    assert by_path["POST", "/app/echo"][3] == "200"
    assert by_path["GET", "/nowhere"][3:7] == ["404", "0", "-", "-"]
    assert all(float(row[7]) >= 0 for row in rows)


def test_bad_access_log_format_stops_the_broker_before_it_starts(fresh_stack: Stack) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "scale0.cli", "broker", "--mongrel2",
                          fresh_stack.link, "--access-log", "-", "--access-log-format",
                          "{nope}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "access_log_format" in out.stderr and "READY" not in out.stdout
