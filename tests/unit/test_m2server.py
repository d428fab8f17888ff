"""scale0.m2server: the generated Mongrel2 config and the open-files limit."""

from __future__ import annotations

import resource

from scale0.m2server import config_text, raise_open_files_limit


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
