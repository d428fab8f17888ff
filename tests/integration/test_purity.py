"""The codecs (scale0/wire/) and the pure cores (scale0/core/) hold no I/O and no clock.

Issue 10: they import no zmq, no socket and nothing that reads the time or
waits (time, datetime, select, threading), not even through another scale0
module; the I/O loops (scale0/net/, scale0/worker/) pass `now` in. Checked
twice: statically, every import statement of those modules and of the scale0
modules they import, wherever it stands (a function body or `if
TYPE_CHECKING` counts too); and at run time, in a fresh interpreter,
importing them all loads no zmq.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "scale0"
FORBIDDEN = frozenset({"zmq", "socket", "time", "datetime", "select", "threading",
                       "asyncio", "selectors", "socketserver"})


def _pure_modules() -> list[str]:
    return sorted(f"scale0.{folder}.{path.stem}" if path.stem != "__init__"
                  else f"scale0.{folder}"
                  for folder in ("wire", "core") for path in (PACKAGE / folder).glob("*.py"))


def _source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str) -> set[str]:
    """Every module `module` imports, by its full name (`from a import b`
    gives a.b when that is a module, else a)."""
    tree = ast.parse(_source(module).read_text(), str(_source(module)))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import (imports are absolute)"
            base = node.module or ""
            found.add(base)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                if base.startswith("scale0") and _source(name).exists():
                    found.add(name)
    return found


def _closure(module: str) -> dict[str, list[str]]:
    """Every module reachable from `module` through scale0 modules, with the
    chain of scale0 modules that leads to it."""
    chains: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        for name in _imports(current):
            if name in chains:
                continue
            chains[name] = [*chains[current], name]
            if name.split(".")[0] == "scale0":
                todo.append(name)
    return chains


def test_the_pure_modules_are_found() -> None:
    modules = _pure_modules()
    assert "scale0.wire.s0w1" in modules and "scale0.core.dispatch" in modules
    assert "scale0.core.worker_events" in modules and "scale0.core.spool" in modules


@pytest.mark.parametrize("module", _pure_modules())
def test_codec_and_core_modules_import_no_zmq_socket_or_clock(module: str) -> None:
    chains = _closure(module)
    bad = {name: chain for name, chain in chains.items() if name.split(".")[0] in FORBIDDEN}
    assert not bad, "\n".join(" -> ".join(chain) for chain in bad.values())
    # And they stay among the pure modules: a core that imports an I/O loop
    # would hide its I/O behind it.
    # scale0.errors, the roots of the one error family, imports nothing at all
    # (tests/unit/test_errors.py), so the codecs may raise its classes.
    impure = sorted(name for name in chains if name.split(".")[0] == "scale0"
                    and name not in ("scale0", "scale0.errors", *_pure_modules()))
    assert not impure, f"{module} imports {impure}"


def test_the_static_check_sees_an_import_through_another_module() -> None:
    """The check can fail: net/broker.py reaches zmq (directly), and
    core/dispatch.py would through any scale0 module that imports it."""
    assert "zmq" in _closure("scale0.net.broker")
    assert "time" in _closure("scale0.ops.control")


def test_importing_the_codecs_and_cores_loads_no_zmq() -> None:
    modules = _pure_modules()
    code = ("import sys\n"
            f"for name in {modules!r}:\n"
            "    __import__(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'socket'))\n"
            "print(' '.join(bad))\n"
            "assert 'scale0.core.dispatch' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"loaded: {result.stdout.strip()}"
