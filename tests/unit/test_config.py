"""config.py: one declaration -> flags, TOML file, SCALE0_* environment; precedence and errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from scale0 import cli, config
from scale0.config import BrokerConfig, ConfigError, UpConfig, WsgiConfig
from scale0.deploy.stack import Stack
from scale0.deploy.stack_file import StackError
from scale0.net.broker import LinkSpec

LINK = "tcp://127.0.0.1:9997,tcp://127.0.0.1:9996"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def resolve(argv: list[str], env: dict[str, str] | None = None) -> Any:
    args = parse(*argv)
    return config.resolve(args.settings, args, env or {})


def write(tmp_path: Path, text: str, name: str = "broker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- precedence: defaults < file < env < CLI ---------------------------------

def test_defaults_are_the_dataclass_defaults() -> None:
    cfg = resolve(["broker", "--mongrel2", LINK])
    assert cfg == BrokerConfig(mongrel2=(LinkSpec.parse(LINK),))
    assert (cfg.queue_size, cfg.queue_timeout, cfg.log_level) == (1024, 10.0, "info")


@pytest.mark.parametrize(("file", "env", "cli", "expected"), [
    (False, False, False, 1024),
    (True, False, False, 10),
    (True, True, False, 20),
    (True, True, True, 30),
    (False, True, False, 20),
    (False, False, True, 30),
    (True, False, True, 30),
])
def test_precedence_of_a_scalar(tmp_path: Path, file: bool, env: bool, cli: bool,
                                expected: int) -> None:
    argv = ["broker", "--mongrel2", LINK]
    if file:
        argv += ["--config", str(write(tmp_path, "queue_size = 10\n"))]
    if cli:
        argv += ["--queue-size", "30"]
    cfg = resolve(argv, {"SCALE0_QUEUE_SIZE": "20"} if env else {})
    assert cfg.queue_size == expected


def test_precedence_of_a_list_replaces_the_whole_list(tmp_path: Path) -> None:
    path = write(tmp_path, f'route = ["/a=one", "/b=two"]\nmongrel2 = ["{LINK}"]\n')
    base = ["broker", "--config", str(path)]
    assert resolve(base).route == (("/a", "one"), ("/b", "two"))
    env = {"SCALE0_ROUTE": "/c=three  example.com/=www"}
    assert resolve(base, env).route == (("/c", "three"), ("example.com/", "www"))
    assert resolve([*base, "--route", "/d=four"], env).route == (("/d", "four"),)
    assert resolve(base, {"SCALE0_ROUTE": ""}).route == ()  # env can empty a file's list
    assert resolve(base).mongrel2 == (LinkSpec.parse(LINK),)


def test_every_kind_of_value_from_the_file(tmp_path: Path) -> None:
    page = tmp_path / "down.html"
    page.write_bytes(b"<h1>back soon</h1>")
    path = write(tmp_path, f"""
mongrel2 = ["{LINK},ident"]
bind = "tcp://127.0.0.1:7000"
queue_timeout = 3          # an int where a float is expected is fine
request_timeout = 2.5
max_body = 1000
service_timeout = ["slow=120"]
maintenance_page = ["shop={page}"]
log_level = "debug"
""")
    cfg = resolve(["broker", "--config", str(path)])
    assert cfg.mongrel2 == (LinkSpec("tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996", b"ident"),)
    assert cfg.bind == "tcp://127.0.0.1:7000"
    assert cfg.queue_timeout == 3.0 and isinstance(cfg.queue_timeout, float)
    assert (cfg.request_timeout, cfg.max_body) == (2.5, 1000)
    assert cfg.service_timeout == (("slow", 120.0),)
    assert cfg.maintenance_page == (("shop", b"<h1>back soon</h1>"),)
    assert cfg.log_level == "debug"


def test_wsgi_app_and_lists_from_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'app = "examples.hello:app"\nconnect = ["tcp://a:1"]\n'
                 'threads = 4\n', "wsgi.toml")
    cfg = resolve(["wsgi", "--config", str(path)])
    assert (cfg.app, cfg.connect, cfg.threads) == ("examples.hello:app", ("tcp://a:1",), 4)
    cfg = resolve(["wsgi", "--config", str(path), "other:app"],
                  {"SCALE0_CONNECT": "tcp://b:1 tcp://c:1", "SCALE0_APP": "env:app"})
    assert (cfg.app, cfg.connect) == ("other:app", ("tcp://b:1", "tcp://c:1"))
    assert resolve(["wsgi"], {"SCALE0_APP": "env:app", "SCALE0_CONNECT": "tcp://b:1"}).app \
        == "env:app"


def test_booleans_from_env_file_and_flags() -> None:
    assert resolve(["up", "--config", "x.toml"]).exit_with_parent is False
    assert resolve(["up", "--config", "x.toml"],
                   {"SCALE0_EXIT_WITH_PARENT": "yes"}).exit_with_parent is True
    assert resolve(["up", "--config", "x.toml", "--no-exit-with-parent"],
                   {"SCALE0_EXIT_WITH_PARENT": "1"}).exit_with_parent is False
    with pytest.raises(ConfigError, match="SCALE0_EXIT_WITH_PARENT: expected true or false, "
                                          "got 'maybe'"):
        resolve(["up", "--config", "x.toml"], {"SCALE0_EXIT_WITH_PARENT": "maybe"})
    # `up --config` is the stack file: never read as a settings file.
    assert parse("up", "--config", "x.toml").stack_file == "x.toml"


# -- help ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["broker", "wsgi", "up"])
def test_help_lists_every_setting_with_its_default(command: str) -> None:
    sub = cli.build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore
    text = " ".join(sub.format_help().split())
    for f, spec in config.specs(config.COMMANDS[command]):
        shown = f.name if spec.positional else config.flag(f.name)
        name = spec.metavar if spec.positional and spec.metavar else shown
        assert name in text, f.name
        assert f"{spec.help} ({config.help_note(f, spec)})" in text, f.name
    assert "(default: 1024)" in text or command != "broker"
    assert "(default: info)" in text


def test_markdown_table_names_every_flag_and_env() -> None:
    table = config.markdown()
    for cls in config.COMMANDS.values():
        for f, _ in config.specs(cls):
            assert f"`{config.env_name(f.name)}`" in table


# -- errors: they name the source and the key ------------------------------------

def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, "queu_size = 5\n")
    with pytest.raises(ConfigError) as err:
        resolve(["broker", "--mongrel2", LINK, "--config", str(path)])
    assert str(err.value) == f"{path}: unknown setting 'queu_size' (did you mean 'queue_size'?)"
    path = write(tmp_path, "[broker]\nbind = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'broker'$"):
        resolve(["broker", "--mongrel2", LINK, "--config", str(path)])


@pytest.mark.parametrize(("line", "message"), [
    ('queue_size = "abc"', "queue_size: expected an integer > 0, got 'abc'"),
    ("queue_size = 0", "queue_size: expected an integer > 0, got 0"),
    ("queue_size = 1.5", "queue_size: expected an integer > 0, got 1.5"),
    ("queue_size = true", "queue_size: expected an integer > 0, got True"),
    ("heartbeat = false", "heartbeat: expected a number of seconds from 0.01 to 600, got False"),
    ("heartbeat = 0.001", "heartbeat: expected a number of seconds from 0.01 to 600, got 0.001"),
    ("keepalive = -1", "keepalive: expected a number > 0, got -1"),
    ("keepalive = inf", "keepalive: expected a number > 0, got inf"),
    ("bind = 6780", "bind: expected a non-empty string, got 6780"),
    ('bind = ""', "bind: expected a non-empty string, got ''"),
    ('log_level = "loud"', "log_level: expected one of debug, info, warning, error, got 'loud'"),
    ('route = "/a=b"', "route: expected a list of [HOST]/PATH=SERVICE, got '/a=b'"),
    ('route = ["/a"]', "route: expected [HOST]/PATH=SERVICE, got '/a'"),
    ("route = [1]", "route: expected [HOST]/PATH=SERVICE, got 1"),
    ('mongrel2 = ["tcp://a:1"]',
     "mongrel2: expected SEND_SPEC,RECV_SPEC[,RECV_IDENT], got 'tcp://a:1'"),
    ('service_timeout = ["slow=0"]',
     "service_timeout: expected SERVICE=SECONDS (seconds > 0), got 'slow=0'"),
    ('maintenance_page = ["shop=/nonexistent/page.html"]',
     "maintenance_page: maintenance page of shop: /nonexistent/page.html: "
     "No such file or directory"),
])
def test_bad_value_names_file_and_key(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as err:
        resolve(["broker", "--mongrel2", LINK, "--config", str(path)])
    assert str(err.value) == f"{path}: {message}"


def test_bad_route_in_wsgi_file_gives_the_routing_reason(tmp_path: Path) -> None:
    path = write(tmp_path, 'app = "a"\nconnect = ["tcp://a:1"]\nroute = ["nopath"]\n')
    with pytest.raises(ConfigError, match=r"route: 'nopath': "):
        resolve(["wsgi", "--config", str(path)])


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: cannot read the settings file")):
        resolve(["broker", "--config", str(missing)])
    bad = write(tmp_path, "queue_size = = 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: not valid TOML")):
        resolve(["broker", "--config", str(bad)])


@pytest.mark.parametrize(("name", "value", "message"), [
    ("SCALE0_QUEUE_SIZE", "abc", "expected an integer > 0, got 'abc'"),
    ("SCALE0_QUEUE_SIZE", "", "expected an integer > 0, got ''"),
    ("SCALE0_QUEUE_TIMEOUT", "nan", "expected a number > 0, got 'nan'"),
    ("SCALE0_LOG_LEVEL", "INFO", "expected one of debug, info, warning, error, got 'INFO'"),
    ("SCALE0_MONGREL2", "tcp://a:1", "expected SEND_SPEC,RECV_SPEC[,RECV_IDENT], got 'tcp://a:1'"),
])
def test_env_errors_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve(["broker", "--mongrel2", LINK], {name: value})
    assert str(err.value) == f"environment {name}: {message}"


def test_cli_bad_value_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse("broker", "--mongrel2", LINK, "--queue-size", "abc")
    assert exit_.value.code == 2
    assert "--queue-size: expected an integer > 0, got 'abc'" in capsys.readouterr().err


def test_missing_required_settings() -> None:
    with pytest.raises(ConfigError, match="no Mongrel2 to serve"):
        resolve(["broker"])
    with pytest.raises(ConfigError, match="handler: needs mongrel2_db"):
        resolve(["broker", "--mongrel2", LINK, "--handler", "/"])
    with pytest.raises(ConfigError, match="missing setting 'app'"):
        resolve(["wsgi", "--connect", "tcp://a:1"])
    with pytest.raises(ConfigError, match="missing setting 'connect': give --connect, "
                                          "SCALE0_CONNECT or connect in the --config file"):
        resolve(["wsgi", "a:app"])


def test_main_reports_a_bad_file_and_exits_2_before_starting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALE0_QUEUE_SIZE", raising=False)
    path = write(tmp_path, f'mongrel2 = ["{LINK}"]\nqueue_size = "abc"\n')
    assert cli.main(["broker", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"scale0 broker: error: {path}: queue_size: expected an integer > 0, got 'abc'\n")


def test_env_typos_are_warned_about_and_other_names_left_alone() -> None:
    env = {"SCALE0_QUEU_SIZE": "1", "SCALE0_PROOF_REPORT": "x", "SCALE0_QUEUE_SIZE": "2"}
    assert config.env_warnings(env, BrokerConfig, WsgiConfig) == [
        "environment SCALE0_QUEU_SIZE is not a setting (did you mean SCALE0_QUEUE_SIZE?)"]


# -- to_argv and the stack file ------------------------------------------------------

def test_to_argv_round_trips_through_the_parser(tmp_path: Path) -> None:
    table = {"app": "m:app", "connect": ["tcp://a:1", "tcp://b:2"], "route": ["/x"],
             "threads": 3, "heartbeat": 0.25, "log_level": "warning"}
    config.from_mapping(WsgiConfig, table, "t")
    argv = config.to_argv(WsgiConfig, table)
    cfg = resolve(["wsgi", *argv])
    assert cfg == WsgiConfig(app="m:app", connect=("tcp://a:1", "tcp://b:2"), route=("/x",),
                             threads=3, heartbeat=0.25, log_level="warning")
    assert config.to_argv(UpConfig, {"exit_with_parent": False}) == ["--no-exit-with-parent"]


def stack(tmp_path: Path, broker: str = "", pool: str = "") -> Stack:
    path = write(tmp_path, f"""
[mongrel2]
config = "m2.conf"
http = "127.0.0.1:6767"
uuid = "u"
[[broker]]
bind = "tcp://127.0.0.1:6780"
mongrel2 = ["{LINK}"]
routes = {{"/static" = "assets"}}
{broker}
[[pool]]
app = "examples.hello:app"
connect = ["tcp://127.0.0.1:6780"]
routes = ["/"]
{pool}
""", "stack.toml")
    return Stack.from_file(path)


def test_stack_tables_take_every_setting(tmp_path: Path) -> None:
    s = stack(tmp_path, "queue_size = 7\nroute = ['/api=api']", "threads = 4\nservice = 'hi'")
    broker, pool = (p.argv[3:] for p in s.procs[1:])
    # The pool's route comes first (configured: 503 while its workers are down),
    # so the broker's own routes win over it.
    # The stack's Mongrel2 upload folder first: the broker removes spooled bodies.
    assert broker[1] == f"--upload-dir={tmp_path}/var/mongrel2/uploads"
    del broker[1]
    assert broker == ["broker", "--route=/=hi", "--bind=tcp://127.0.0.1:6780",
                      f"--mongrel2={LINK}", "--queue-size=7", "--route=/api=api",
                      "--route=/static=assets"]
    assert resolve(broker).route == (
        ("/", "hi"), ("/api", "api"), ("/static", "assets"))
    assert pool[0] == "wsgi" and "--threads=4" in pool and "--service=hi" in pool
    assert resolve(pool).threads == 4


@pytest.mark.parametrize(("broker", "pool", "message"), [
    ("queu_size = 7", "", "stack.toml: broker[0]: unknown setting 'queu_size' "
                          "(did you mean 'queue_size'?)"),
    ("", "rotes = ['/']", "stack.toml: pool[0]: unknown setting 'rotes' "
                          "(did you mean 'routes'?)"),
    ("queue_size = 'abc'", "", "stack.toml: broker[0]: queue_size: expected an integer > 0, "
                               "got 'abc'"),
    ("", "processes = 0", "stack.toml: pool[0]: processes: expected an integer > 0, got 0"),
    ("", "args = '--x'", "stack.toml: pool[0].args must be a list"),
])
def test_stack_table_errors_name_file_and_key(tmp_path: Path, broker: str, pool: str,
                                              message: str) -> None:
    with pytest.raises(StackError) as err:
        stack(tmp_path, broker, pool)
    assert str(err.value) == f"{tmp_path}/{message}"


def test_stack_unknown_top_level_and_mongrel2_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "graceful_timout = 3\n", "s.toml")
    with pytest.raises(StackError, match="unknown setting 'graceful_timout' "
                                         r"\(did you mean 'graceful_timeout'\?\)"):
        Stack.from_file(path)
    path = write(tmp_path, "[mongrel2]\nconfig = 'x'\nhttp = 'h:1'\nruntime = 'v'\n", "s.toml")
    with pytest.raises(StackError, match=r"s.toml: mongrel2: unknown setting 'runtime' "
                                         r"\(did you mean 'runtime_dir'\?\)"):
        Stack.from_file(path)


def test_stack_checks_relative_paths_from_the_stack_file_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The processes run in the stack file's folder: a relative maintenance
    # page is checked from there, wherever `scale0 up` was started.
    (tmp_path / "down.html").write_text("<h1>down</h1>")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = stack(tmp_path, "maintenance_page = ['app=down.html']", "")
    assert "--maintenance-page=app=down.html" in s.procs[1].argv
    with pytest.raises(StackError, match=r"missing\.html"):
        stack(tmp_path, "maintenance_page = ['app=missing.html']", "")


def broker_routes(tmp_path: Path, text: str) -> list[list[str]]:
    path = write(tmp_path, '[mongrel2]\nconfig = "m2.conf"\nhttp = "127.0.0.1:6767"\n'
                 'uuid = "u"\n' + text, "stack.toml")
    return [[a for a in p.argv if a.startswith("--route=")]
            for p in Stack.from_file(path).procs if p.name.startswith("broker")]


def test_each_broker_gets_the_routes_of_the_pools_that_connect_to_it(tmp_path: Path) -> None:
    brokers = f"""
[[broker]]
bind = "tcp://127.0.0.1:6780"
mongrel2 = ["{LINK}"]
[[broker]]
bind = "tcp://*:6782"
mongrel2 = ["{LINK}"]
"""
    pools = """
[[pool]]
app = "pkg.web:app"
connect = ["tcp://127.0.0.1:6780"]
routes = ["/web", "example.com/"]
[[pool]]
app = "api:app"
service = "api"
connect = ["tcp://10.0.0.2:6782"]
route = ["/api"]
[[pool]]
app = "other:app"
connect = ["tcp://localhost:6780"]
routes = ["/other"]
"""
    assert broker_routes(tmp_path, brokers + pools) == [
        ["--route=/web=web", "--route=example.com/=web", "--route=/other=other"],
        ["--route=/api=api", "--route=/other=other"],  # a bind on every interface
    ]


def test_stack_pool_interface_asgi_takes_asgi_settings(tmp_path: Path) -> None:
    s = stack(tmp_path, "", "interface = 'asgi'\nconcurrency = 300\nlifespan = 'on'")
    pool = s.procs[-1].argv[3:]
    assert pool[0] == "asgi" and "--concurrency=300" in pool
    cfg = resolve(pool)
    assert isinstance(cfg, config.AsgiConfig) and cfg.concurrency == 300
    assert cfg.lifespan == "on"
    with pytest.raises(StackError, match=r"pool\[0\]: unknown setting 'threads'"):
        stack(tmp_path, "", "interface = 'asgi'\nthreads = 2")
    with pytest.raises(StackError, match=r"pool\[0\].interface must be one of wsgi, asgi"):
        stack(tmp_path, "", "interface = 'rsgi'")


def test_asgi_shares_the_pool_settings_and_bounds_concurrency() -> None:
    cfg = resolve(["asgi", "m:create_app()", "--connect", "tcp://a:1", "--processes", "3",
                   "--max-requests", "9", "--timeout", "5", "--graceful-timeout", "2"])
    assert isinstance(cfg, config.AsgiConfig)
    assert (cfg.app, cfg.processes, cfg.max_requests, cfg.timeout, cfg.graceful_timeout,
            cfg.concurrency) == ("m:create_app()", 3, 9, 5.0, 2.0, 100)
    with pytest.raises(ConfigError, match="SCALE0_CONCURRENCY: expected an integer from 1 "
                                          "to 10000"):
        resolve(["asgi", "m:app", "--connect", "tcp://a:1"], {"SCALE0_CONCURRENCY": "10001"})
