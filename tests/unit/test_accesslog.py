"""The access log writer: format, destinations, reopen after rotation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from scale0.core.dispatch import Done
from scale0.ops.accesslog import DEFAULT_FORMAT, FIELDS, AccessLog, AccessLogError, check_format


def _done(conn_id: int = 7, status: int = 200) -> Done:
    now = time.monotonic()
    return Done(0, conn_id, "GET", "/a?b=1", "hello", "host:12", status, 300, 1234,
                now - 0.0125, now, 1)


def _wait_lines(path: Path, n: int) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.01)
    raise AssertionError(f"{path}: fewer than {n} lines")


def test_default_format_line(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out))
    log.start()
    log.sink([_done(), _done(8, 404)])
    log.close()
    first, second = out.read_text().splitlines()
    stamp, rest = first.split(" ", 1)
    assert rest == '7 "GET /a?b=1" 200 1234 12.5ms hello host:12'
    assert stamp[:4].isdigit() and stamp[10] == "T"
    assert second.split(" ", 1)[1].startswith('8 "GET /a?b=1" 404 ')


def test_custom_format_and_every_field_is_usable(tmp_path: Path) -> None:
    out = tmp_path / "a.log"
    template = " ".join("{" + name + "}" for name in FIELDS)
    log = AccessLog(str(out), template)
    log.start()
    log.sink([_done()])
    log.close()
    (line,) = out.read_text().splitlines()
    assert len(line.split(" ")) == len(FIELDS)


@pytest.mark.parametrize("template", ["{nope}", "{status", "{0}", "{status:q}"])
def test_bad_format_is_a_clear_error(template: str) -> None:
    with pytest.raises(AccessLogError, match="access_log_format"):
        check_format(template)
    check_format(DEFAULT_FORMAT)


def test_file_is_reopened_after_rotation(tmp_path: Path) -> None:
    out = tmp_path / "access.log"
    log = AccessLog(str(out))
    log.start()
    log.sink([_done(1)])
    _wait_lines(out, 1)
    os.rename(out, tmp_path / "access.log.1")  # logrotate without copytruncate
    log.sink([_done(2)])
    log.close()
    assert len(out.read_text().splitlines()) == 1
    assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AccessLogError, match="access_log"):
        AccessLog(str(tmp_path / "missing-dir" / "a.log")).start()
