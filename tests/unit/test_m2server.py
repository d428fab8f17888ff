"""scale0.deploy.m2server: the generated Mongrel2 config (and the shipped one's header
limit) and the open-files limit."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest

from scale0.deploy.m2server import raise_open_files_limit
from tests.mongrel2_helpers import HEADER_BUFFER_BYTES, config_text

ROOT = Path(__file__).resolve().parents[2]


def _conf(**extra: bool) -> str:
    return config_text(http_port=1, send_spec="tcp://127.0.0.1:2",
                       recv_spec="tcp://127.0.0.1:3", send_ident="x", **extra)


def test_config_text_sets_flow_control_on_by_default_and_off_when_asked() -> None:
    assert '"download.flow_control": 1,' in _conf()
    assert '"download.flow_control": 0,' in _conf(flow_control=False)


def test_raise_open_files_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        new_soft = raise_open_files_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new_soft
        if hard != resource.RLIM_INFINITY:
            assert new_soft == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _settings(text: str) -> dict[str, str]:
    block = text[text.index("settings = {"):]
    return dict(re.findall(r'"([a-z_.]+)":\s*("?[^",\n}]+"?)', block[:block.index("}")]))


def test_generated_config_sets_the_header_buffer() -> None:
    assert _settings(_conf())["limits.buffer_size"] == str(HEADER_BUFFER_BYTES)


def test_a_given_setting_replaces_the_default_once() -> None:
    text = config_text(http_port=1, send_spec="tcp://a:1", recv_spec="tcp://a:2",
                       send_ident="x", settings={"limits.buffer_size": 8192, "upload.stream": 1})
    assert text.count("limits.buffer_size") == 1
    assert _settings(text)["limits.buffer_size"] == "8192"
    assert _settings(text)["upload.stream"] == "1"


def test_a_header_buffer_over_the_spool_threshold_is_refused() -> None:
    # Mongrel2 1.12 corrupts spooled uploads when buffer_size > content_length.
    with pytest.raises(ValueError, match="corrupts"):
        config_text(http_port=1, send_spec="tcp://a:1", recv_spec="tcp://a:2",
                    send_ident="x", settings={"limits.buffer_size": 32768})


def test_shipped_config_sets_the_header_buffer() -> None:
    text = (ROOT / "mongrel2" / "mongrel2.conf").read_text()
    assert _settings(text)["limits.buffer_size"] == str(HEADER_BUFFER_BYTES)
