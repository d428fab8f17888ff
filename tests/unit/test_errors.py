"""One error family (scale0/errors.py): every exception class Scale0 defines is a
Scale0Error, the protocol ones carry a status hint, old bases are kept."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import scale0
from scale0 import errors
from scale0.errors import ConfigError, ProtocolError, Scale0Error
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for info in pkgutil.walk_packages(scale0.__path__, "scale0."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(obj)
    return found


def test_every_exception_class_of_scale0_is_a_scale0_error() -> None:
    classes = _exception_classes()
    assert len(classes) >= 18  # the family as errors.py draws it
    outside = [f"{c.__module__}.{c.__qualname__}" for c in classes
               if not issubclass(c, Scale0Error)]
    assert outside == []


def test_the_module_tree_in_errors_py_names_every_class() -> None:
    doc = errors.__doc__ or ""
    for cls in _exception_classes():
        if cls.__module__ != "scale0.errors":
            assert cls.__name__ in doc, cls


def test_errors_py_imports_nothing_of_scale0() -> None:
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert all(name == "__future__" for name in imported), imported


@pytest.mark.parametrize(("cls", "old_base"), [
    (m2.Mongrel2ProtocolError, ValueError), (m2r.ReplyError, ValueError),
    (p.WireError, ValueError), (ConfigError, ValueError)])
def test_old_bases_are_kept_for_callers_that_catch_them(
        cls: type[Exception], old_base: type[Exception]) -> None:
    assert issubclass(cls, old_base) and issubclass(cls, Scale0Error)


def test_protocol_errors_carry_a_status_hint() -> None:
    assert ProtocolError("x").status_hint == 400
    assert m2.Mongrel2ProtocolError("x", status_hint=413).status_hint == 413
    assert p.WireError("x").status_hint == 502 and p.WireError("x").code == p.ERR_BAD_MESSAGE
    from scale0.core.bodystream import BodyError
    from scale0.worker import asgi, wsgi
    assert BodyError("too big", status_hint=413).status_hint == 413
    assert wsgi.BadRequest(431, "headers").status_hint == 431
    assert wsgi.ApplicationError("no start_response").status_hint == 500
    assert asgi.ProtocolError("bad event").status_hint == 500
    assert issubclass(asgi.ProtocolError, RuntimeError)


@pytest.mark.parametrize("build", [
    lambda: m2r.reply(b"bad sender", 1, b""),
    lambda: m2r.reply_prefix(b"", 1),
    lambda: m2r.close_reply(b"s", []),
    lambda: m2r.close_reply(b"s", [-1]),
    lambda: m2r.http_response(99, []),
    lambda: m2r.http_response(200, [(b"X", b"a\r\nSet-Cookie: x")]),
    lambda: m2r.http_response(200, [(b"", b"v")]),
])
def test_reply_builders_raise_reply_error(build: object) -> None:
    with pytest.raises(m2r.ReplyError) as info:
        build()  # type: ignore[operator]
    assert info.value.status_hint == 500


def test_a_decoding_error_is_not_a_reply_error() -> None:
    with pytest.raises(m2.Mongrel2ProtocolError) as info:
        m2.parse_message(b"not a message")
    assert not isinstance(info.value, m2r.ReplyError)
