"""Settings declared once, also inside (issue 10 point 5): the internal settings
objects get their values through config.build by declared names, their
defaults equal the declarations, and config and the ctl client import no
more than they should."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scale0 import config
from scale0.config.load import targets
from scale0.core.dispatch import DispatchSettings
from scale0.net.broker import Broker
from scale0.net.relay import Relay
from scale0.pool.supervise import Pool
from scale0.worker.asgi_loop import AsgiSettings
from scale0.worker.process import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]

# (internal target, the command whose settings build it, names it takes that no
# setting holds: derived or built by cli.py, or internal tunables)
TARGETS: list[tuple[Callable[..., Any], type[config.CommonConfig], set[str]]] = [
    (DispatchSettings, config.BrokerConfig, {"max_retries", "inline_budget_bytes"}),
    (Broker, config.BrokerConfig, {"links", "settings", "context", "startup_grace_s", "curve",
                                   "relay_curve"}),
    (Relay, config.RelayConfig, {"recv_spec", "recv_ident", "curve"}),
    (WorkerSettings, config.WsgiConfig, {"services", "reconnect_max_s", "label", "meta",
                                         "curve"}),
    (AsgiSettings, config.AsgiConfig, {"services", "reconnect_max_s", "label", "forwarded",
                                       "curve"}),
    (Pool, config.WsgiConfig, {"target", "size", "name", "on_ready"}),
    (Pool, config.AsgiConfig, {"target", "size", "name", "on_ready"}),
]
# Defaults that differ on purpose: the dispatcher inlines nothing unless the
# broker is given an upload_dir (cli.py passes inline_body_max only then); a
# Broker made in code has no control socket unless asked ("auto" is what
# `scale0 broker` asks for by default).
DIFFERENT_ON_PURPOSE = {(DispatchSettings, "inline_body_max"), (Broker, "control")}


def _defaults(target: Callable[..., Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(target):
        return {f.name: f.default for f in dataclasses.fields(target)
                if f.default is not dataclasses.MISSING}
    return {name: p.default for name, p in inspect.signature(target).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _fed(cls: type[config.CommonConfig], names: set[str]) -> dict[str, Any]:
    """internal name -> the declared field that feeds it."""
    return {(spec.to or f.name): f for f, spec in config.specs(cls)
            if (spec.to or f.name) in names}


@pytest.mark.parametrize(("target", "cls", "own"), TARGETS)
def test_every_name_an_internal_object_takes_is_a_setting_or_named_as_its_own(
        target: Callable[..., Any], cls: type[config.CommonConfig], own: set[str]) -> None:
    names = targets(target)
    fed = _fed(cls, names)
    assert names - set(fed) == own  # nothing left to a hand-written rename
    assert not own & set(fed)


@pytest.mark.parametrize(("target", "cls", "own"), TARGETS)
def test_internal_defaults_are_the_declared_ones(
        target: Callable[..., Any], cls: type[config.CommonConfig], own: set[str]) -> None:
    defaults = _defaults(target)
    for inner, f in _fed(cls, targets(target)).items():
        if inner in defaults and (target, inner) not in DIFFERENT_ON_PURPOSE:
            assert defaults[inner] == f.default, (target, inner, f.name)


def test_every_to_names_something_inside() -> None:
    inside = set().union(*(targets(t) for t, _, _ in TARGETS))
    for cls in config.COMMANDS.values():
        for f, spec in config.specs(cls):
            assert not spec.to or spec.to in inside, (cls.__name__, f.name, spec.to)


def test_build_passes_each_setting_by_its_declared_name() -> None:
    cfg = config.BrokerConfig(mongrel2=(config.LinkSpec.parse("tcp://a:1,tcp://a:2"),),
                              queue_timeout=3.5, max_body=1000, route=(("/x", "svc"),),
                              eject_time=7.0, heartbeat=0.5, liveness=9)
    d = config.build(DispatchSettings, cfg, upload_dir="/up")
    assert (d.queue_timeout_s, d.max_body_bytes, d.routes, d.eject_s) == (
        3.5, 1000, (("/x", "svc"),), 7.0)
    assert (d.heartbeat_s, d.liveness, d.upload_dir) == (0.5, 9, "/up")
    assert d.max_retries == DispatchSettings().max_retries  # no setting: its own default


def test_what_build_is_given_wins_over_the_setting() -> None:
    cfg = config.WsgiConfig(app="m:app", connect=("tcp://b:1",), graceful_timeout=4.0,
                            threads=3)
    w = config.build(WorkerSettings, cfg, services=(), graceful_timeout_s=1.0)
    assert (w.graceful_timeout_s, w.capacity, w.connect) == (1.0, 3, ("tcp://b:1",))
    with pytest.raises(TypeError):
        config.build(WorkerSettings, cfg, services=(), no_such_field=1)


def _loaded(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    return set(result.stdout.split())


def test_config_imports_no_zmq() -> None:
    loaded = _loaded("scale0.config")
    assert not {m for m in loaded if m.split(".")[0] == "zmq"}
    assert "scale0.net.broker" not in loaded


def test_the_ctl_client_imports_no_server_side() -> None:
    loaded = _loaded("scale0.ops.ctl")
    server = {m for m in loaded if m.startswith(("scale0.core", "scale0.net", "scale0.config"))
              or m == "scale0.ops.control"}
    assert server == set()
    assert "scale0.wire.control" in loaded
