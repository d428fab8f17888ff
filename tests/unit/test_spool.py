"""Tests for scale0.net.spool_files (spooled bodies removed inside the upload folder only)
and scale0.core.spool (a body put into its request)."""

from __future__ import annotations

import os
from pathlib import Path

from scale0.net.spool_files import remove, spooled_file


def test_files_are_taken_by_name_inside_the_upload_folder(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    (uploads / "upload.A").write_text("a")
    outside = tmp_path / "keep"
    outside.write_text("k")
    assert spooled_file(b"uploads/upload.A", str(uploads)) == str(uploads / "upload.A")
    assert spooled_file(b"/x/../keep", str(uploads)) == str(uploads / "keep")
    for bad in (b"", b"uploads/", b"..", b"a/.", b"x\0y"):
        assert spooled_file(bad, str(uploads)) is None
    assert remove([b"uploads/upload.A", b"/elsewhere/keep", b"uploads/gone", b".."],
                  str(uploads)) == 1
    assert list(uploads.iterdir()) == [] and outside.read_text() == "k"


def test_without_an_upload_folder_nothing_is_touched(tmp_path: Path) -> None:
    (tmp_path / "upload.A").write_text("a")
    assert remove([str(tmp_path / "upload.A").encode()], None) == 0
    assert (tmp_path / "upload.A").exists()


def test_read_takes_small_regular_files_only(tmp_path: Path) -> None:
    from scale0.net.spool_files import read

    (tmp_path / "upload.A").write_bytes(b"a" * 10)
    (tmp_path / "real").write_bytes(b"secret")
    (tmp_path / "upload.L").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "upload.F")
    assert read(b"uploads/upload.A", str(tmp_path), 10) == b"a" * 10
    assert read(b"uploads/upload.A", str(tmp_path), 9) is None  # too large: stays a file
    for name in (b"uploads/upload.L", b"uploads/upload.F", b"uploads/none", b".."):
        assert read(name, str(tmp_path), 100) is None


def test_inline_message_is_an_ordinary_request() -> None:
    from scale0.core.spool import inline_message
    from scale0.wire import mongrel2 as m2

    headers: dict[bytes, bytes | list[bytes]] = {
        b"METHOD": b"POST", b"PATH": b"/up", b"transfer-encoding": b"chunked",
        b"x-mongrel2-upload-start": b"u/1", b"x-mongrel2-upload-done": b"u/1",
        b"cookie": [b"a=1", b"b=2"]}
    done = m2.UploadDone(b"s-1", 9, b"/up", headers, b"", upload_path=b"u/1")
    event = m2.parse_message(inline_message(done, b"hello"))
    assert isinstance(event, m2.HttpRequest)
    assert (event.conn_id, event.path, event.body) == (9, b"/up", b"hello")
    assert event.headers == {b"METHOD": b"POST", b"PATH": b"/up", b"content-length": b"5",
                             b"cookie": [b"a=1", b"b=2"]}
