"""Tests for scale0.spool: spooled bodies removed inside the upload folder only."""

from __future__ import annotations

from pathlib import Path

from scale0.spool import remove, spooled_file


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
