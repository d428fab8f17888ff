"""Tests for scale0.core.routing: normalisation, route parsing, longest-match lookup."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.core.routing import (
    Match,
    Route,
    RouteTable,
    normalize_host,
    normalize_path,
    parse_route,
    split_script_name,
)

# -- normalize_path -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "/"),
        ("/", "/"),
        ("/app", "/app"),
        ("app", "/app"),
        # dot segments (RFC 3986 5.2.4), never climbing above '/'
        ("/x/../app", "/app"),
        ("/../../etc", "/etc"),
        ("/a/./b", "/a/b"),
        ("/a/.", "/a/"),
        ("/a/b/..", "/a/"),
        ("/.", "/"),
        ("/..", "/"),
        ("/a/../../b/./c/..", "/b/"),
        ("/a/..b/.c", "/a/..b/.c"),
        ("/.well-known/acme", "/.well-known/acme"),
        # duplicate slashes
        ("//a///b/./c/", "/a/b/c/"),
        ("//app", "/app"),
        # trailing slash kept
        ("/a/b/", "/a/b/"),
        # unreserved escapes decoded, others uppercased (RFC 3986 6.2.2.1-2)
        ("/%61pp", "/app"),
        ("/%7e%2D%5f%2E%30", "/~-_.0"),
        ("/a%2fb", "/a%2Fb"),
        ("/%2F", "/%2F"),
        ("/a%3fb", "/a%3Fb"),
        ("/a%c3%a9", "/a%C3%A9"),
        # escaped dots are dot segments
        ("/a/%2e%2E/b", "/b"),
        ("/a/%2e/b", "/a/b"),
        # query and fragment dropped
        ("/a?x=1&y=/../", "/a"),
        ("/a/?x", "/a/"),
        ("/a#frag", "/a"),
        ("?q", "/"),
        # characters outside pchar and stray '%' are encoded
        ("/a b", "/a%20b"),
        ("/50%", "/50%25"),
        ("/%zz", "/%25zz"),
        ("/%%361", "/%2561"),
        ("/€", "/%E2%82%AC"),
        ("/!$&'()*+,;=:@", "/!$&'()*+,;=:@"),
        # bytes are decoded latin-1
        (b"/caf\xe9", "/caf%E9"),
        (b"/caf\xc3\xa9", "/caf%C3%A9"),
        (b"/x/../app?q", "/app"),
    ],
)
def test_normalize_path(raw: bytes | str, expected: str) -> None:
    assert normalize_path(raw) == expected
    assert normalize_path(expected) == expected


_PATH_ALPHABET = st.sampled_from(
    ["/", "/", "/", ".", ".", "..", "%", "%2e", "%2E", "%2f", "%41", "%7e", "%zz",
     "a", "b", "Z", "0", "~", "-", "?", "#", " ", "é", "€", ":", "@", "\\", "%25"]
)  # fmt: skip
_raw_paths = st.one_of(
    st.lists(_PATH_ALPHABET, max_size=20).map("".join),
    st.text(max_size=30),
    st.binary(max_size=30),
)


def _check_normal_form(path: str) -> None:
    assert path.startswith("/")
    for bad in ("/./", "/../", "//"):
        assert bad not in path
    assert not path.endswith(("/.", "/.."))
    assert normalize_path(path) == path


@settings(max_examples=200, deadline=None)
@given(_raw_paths)
def test_normalize_path_is_idempotent_normal_form(raw: bytes | str) -> None:
    _check_normal_form(normalize_path(raw))


# -- normalize_host -----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ""),
        ("", ""),
        (b"", ""),
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        (b"EXAMPLE.com", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("example.com.:80", "example.com"),
        (" example.com ", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[FE80::1]:443", "[fe80::1]"),
        ("fe80::1", "fe80::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("localhost:", "localhost"),
    ],
)
def test_normalize_host(raw: bytes | str | None, expected: str) -> None:
    assert normalize_host(raw) == expected


# -- parse_route / Route ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "host", "prefix"),
    [
        ("/", "", "/"),
        ("/api", "", "/api"),
        ("/api/", "", "/api"),
        ("*/api", "", "/api"),
        ("  /api  ", "", "/api"),
        ("example.com/api", "example.com", "/api"),
        ("Example.COM:8080/api/", "example.com", "/api"),
        ("example.com./", "example.com", "/"),
        ("*.example.com/x", "*.example.com", "/x"),
        ("*.Example.com:443/x", "*.example.com", "/x"),
        ("[::1]:8080/", "[::1]", "/"),
        ("10.0.0.1/a", "10.0.0.1", "/a"),
        ("my_host/a", "my_host", "/a"),
        ("example.com/a//b/../c/", "example.com", "/a/c"),
        ("/a/%2e%2e/b", "", "/b"),
        ("/%61pp", "", "/app"),
        ("/a%2fb", "", "/a%2Fb"),
        ("/café", "", "/caf%C3%A9"),
        ("/..", "", "/"),
    ],
)
def test_parse_route(spec: str, host: str, prefix: str) -> None:
    route = parse_route(spec)
    assert (route.host, route.prefix) == (host, prefix)
    assert parse_route(str(route)) == route


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "example.com",
        "*",
        "/a b",
        "/a\tb",
        "/a\x00",
        "/a\x7f",
        "example.com /x",
        "ex ample.com/x",
        "http://example.com/x",
        "example.com:http/x",
        "*.*.example.com/x",
        "api.*.com/x",
        "exa$mple.com/x",
        "[::1/x",
        "/a?b=1",
        "/a#top",
    ],
)
def test_parse_route_rejects(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_route(spec)
    assert repr(spec) in str(info.value)


def test_route_str_and_canonical_constructor() -> None:
    assert str(parse_route("/api")) == "/api"
    assert str(parse_route("Example.com/api/")) == "example.com/api"
    assert str(parse_route("example.com/")) == "example.com/"
    assert Route("EXAMPLE.com:80", "/api/") == Route("example.com", "/api")
    assert Route("*", "/") == Route("", "/")
    assert hash(Route("Example.com", "/a")) == hash(Route("example.com", "/a"))
    with pytest.raises(ValueError, match="must start with '/'"):
        Route("", "api")
    with pytest.raises(ValueError, match="bad host"):
        Route("a b", "/")


@st.composite
def _routes(draw: st.DrawFn) -> Route:
    host = draw(st.sampled_from(_ROUTE_HOSTS))
    segments = draw(st.lists(st.sampled_from(["a", "b", "ab", "a%2Fb", "%7E", "."]), max_size=3))
    return Route(host, "/" + "/".join(segments))


_ROUTE_HOSTS = [
    "", "example.com", "api.example.com", "*.example.com", "*.api.example.com",
    "badexample.com", "com", "other.org", "0.1", "10.0.0.1", "[::1]",
]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_routes())
def test_route_str_round_trips(route: Route) -> None:
    assert parse_route(str(route)) == route
    assert route.prefix == "/" or not route.prefix.endswith("/")


# -- RouteTable ---------------------------------------------------------------


def _table(**specs: str) -> RouteTable:
    """RouteTable from service=spec pairs (service names are the keywords)."""
    return RouteTable((parse_route(spec), service) for service, spec in specs.items())


def _service(table: RouteTable, host: bytes | str | None, path: bytes | str) -> str | None:
    match = table.lookup(host, path)
    return None if match is None else match.service


def test_exact_host_beats_suffix_and_any_host() -> None:
    table = _table(apex="example.com/", api="api.example.com/", anyhost="/")
    assert _service(table, "api.example.com", "/x") == "api"
    assert _service(table, "x.api.example.com", "/x") == "api"  # longest suffix
    assert _service(table, "www.example.com", "/x") == "apex"
    assert _service(table, "example.com", "/x") == "apex"
    assert _service(table, "elsewhere.org", "/x") == "anyhost"
    assert _service(table, None, "/x") == "anyhost"


def test_suffix_only_on_label_boundary() -> None:
    table = _table(apex="example.com/")
    assert _service(table, "badexample.com", "/") is None
    assert _service(table, "example.com.evil.org", "/") is None
    assert _service(table, "a.b.example.com", "/") == "apex"


def test_wildcard_matches_subdomains_only() -> None:
    table = _table(wild="*.example.com/")
    assert _service(table, "example.com", "/") is None
    assert _service(table, "a.example.com", "/") == "wild"
    assert _service(table, "a.b.example.com", "/") == "wild"
    assert _service(table, "badexample.com", "/") is None
    assert _service(table, "*.example.com", "/") is None  # a forged '*' Host is no name
    # With both, the apex goes to the plain route, subdomains to the wildcard.
    table.add(parse_route("example.com/"), "apex")
    assert _service(table, "example.com", "/") == "apex"
    assert _service(table, "a.example.com", "/") == "wild"
    # A longer plain suffix beats a shorter wildcard.
    table.add(parse_route("b.example.com/"), "b")
    assert _service(table, "a.b.example.com", "/") == "b"


def test_host_is_case_insensitive_and_port_ignored() -> None:
    table = _table(api="api.example.com/")
    assert _service(table, "API.Example.COM:8443", "/") == "api"
    assert _service(table, b"api.example.com.", "/") == "api"
    assert _service(table, b"Api.Example.com:80", b"/x") == "api"


def test_ip_literals_match_exactly() -> None:
    table = _table(short="0.1/", ip="10.0.0.1/", v6="[::1]/")
    assert _service(table, "10.0.0.1:80", "/") == "ip"
    assert _service(table, "20.0.0.1", "/") is None
    assert _service(table, "[::1]:8080", "/") == "v6"


def test_best_host_wins_over_longer_any_host_prefix() -> None:
    table = _table(host="example.com/", deep="/api/v1")
    assert _service(table, "example.com", "/api/v1/x") == "host"
    assert _service(table, "other.org", "/api/v1/x") == "deep"


def test_falls_back_when_best_host_lacks_the_prefix() -> None:
    table = _table(host_api="example.com/api", anyhost="/")
    assert _service(table, "example.com", "/api/x") == "host_api"
    assert _service(table, "example.com", "/other") == "anyhost"
    assert _service(table, "example.com", "/apix") == "anyhost"
    # Exact host -> suffix host -> any host.
    table = _table(exact="api.example.com/v1", suffix="example.com/v2", anyhost="/v3")
    assert _service(table, "api.example.com", "/v1") == "exact"
    assert _service(table, "api.example.com", "/v2") == "suffix"
    assert _service(table, "api.example.com", "/v3") == "anyhost"
    assert _service(table, "api.example.com", "/v4") is None


def test_longest_prefix_on_segment_boundaries() -> None:
    table = _table(root="/", app="/app", admin="/app/admin")
    assert _service(table, None, "/app/admin/x") == "admin"
    assert _service(table, None, "/app/admin") == "admin"
    assert _service(table, None, "/app/adminx") == "app"
    assert _service(table, None, "/app") == "app"
    assert _service(table, None, "/app/") == "app"
    assert _service(table, None, "/app/x?y=1") == "app"
    assert _service(table, None, "/apple") == "root"
    assert _service(table, None, "/") == "root"
    assert _service(table, None, "") == "root"


def test_lookup_normalizes_the_raw_path() -> None:
    table = _table(app="/app")
    for raw in ("/x/../app", "//app", "/%61pp/x", b"/./app/", "/../app", "/a/%2e%2e/app"):
        assert _service(table, None, raw) == "app", raw
    assert _service(table, None, "/apple") is None
    assert _service(table, None, "/app%2Fx") is None  # '%2F' is not a boundary
    table = _table(enc="/a%2fb")
    assert _service(table, None, "/a%2Fb/c") == "enc"
    assert _service(table, None, "/a/b") is None


def test_match_fields() -> None:
    table = _table(root="/", app="example.com/app")
    assert table.lookup("example.com", "/app/x") == Match(
        "app", parse_route("example.com/app"), "/app"
    )
    assert table.lookup("example.com", "/x") == Match("root", parse_route("/"), "")
    assert RouteTable().lookup("example.com", "/") is None


def test_add_replaces_and_is_idempotent() -> None:
    table = RouteTable()
    route = parse_route("/api")
    table.add(route, "one")
    table.add(route, "one")
    assert len(table) == 1
    table.add(parse_route("/api/"), "two")
    assert len(table) == 1
    assert _service(table, None, "/api") == "two"
    assert table.routes() == [(route, "two")]
    with pytest.raises(ValueError, match="service"):
        table.add(route, "")


def test_remove() -> None:
    table = _table(root="/", app="/app", deep="/app/a/b/c", host="example.com/app")
    assert len(table) == 4
    assert table.remove(parse_route("/nope")) is False
    assert table.remove(parse_route("other.org/app")) is False
    assert table.remove(parse_route("/app"), "wrong") is False
    assert _service(table, None, "/app/x") == "app"
    assert table.remove(parse_route("/app"), "app") is True
    assert table.remove(parse_route("/app")) is False
    assert _service(table, None, "/app/x") == "root"
    assert table.remove(parse_route("example.com/app")) is True
    assert _service(table, "example.com", "/app/x") == "root"
    # Removing the deepest route keeps shallower ones reachable from deep paths.
    table.add(parse_route("/app/a"), "a")
    assert table.remove(parse_route("/app/a/b/c")) is True
    assert _service(table, None, "/app/a/b/c/d/e") == "a"
    assert len(table) == 2
    assert table.remove(parse_route("/")) and table.remove(parse_route("/app/a"))
    assert len(table) == 0
    assert table.routes() == []
    assert table.lookup(None, "/") is None


def test_routes_sorted() -> None:
    table = _table(c="z.org/b", a="/x", b="/", d="a.org/")
    assert [str(route) for route, _ in table.routes()] == ["/", "/x", "a.org/", "z.org/b"]
    assert [service for _, service in table.routes()] == ["b", "a", "d", "c"]


# -- brute-force reference ------------------------------------------------------


def _host_rank(route_host: str, host: str) -> tuple[int, int, int] | None:
    """Lower is better; None if `route_host` does not serve `host`."""
    if route_host == "":
        return (3, 0, 0)
    if route_host == host:
        return (0, 0, 0)
    is_ip = host.startswith("[") or host.rsplit(".", 1)[-1].isdigit()
    if is_ip:
        return None
    if route_host.startswith("*."):
        suffix = route_host[2:]
        return (1, -len(suffix), 0) if host.endswith("." + suffix) else None
    return (1, -len(route_host), 1) if host.endswith("." + route_host) else None


def _under(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def _reference(
    routes: list[tuple[Route, str]], host: bytes | str | None, raw: bytes | str
) -> tuple[Route, str] | None:
    norm_host, path = normalize_host(host), normalize_path(raw)
    best: tuple[tuple[int, int, int], int, Route, str] | None = None
    for route, service in routes:
        rank = _host_rank(route.host, norm_host)
        if rank is None or not _under(path, route.prefix):
            continue
        key = (rank, -len(route.prefix), route, service)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else (best[2], best[3])


_request_hosts = st.sampled_from(
    [None, "", "example.com", "API.example.com:8080", "x.api.example.com", "example.com.",
     "badexample.com", "com", "other.org", "www.other.org", "10.0.0.1", "20.0.0.1",
     "[::1]:80", "b.example.com"]
)  # fmt: skip
_request_paths = st.lists(
    st.sampled_from(["/", "a", "b", "ab", "a%2fb", "%61", "..", ".", "%2e", "~", "%7e", "?q"]),
    max_size=8,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_routes(), st.sampled_from(["s1", "s2", "s3"])), max_size=12),
    st.lists(st.tuples(_request_hosts, _request_paths), min_size=1, max_size=5),
    st.lists(_routes(), max_size=3),
)
def test_lookup_matches_brute_force(
    entries: list[tuple[Route, str]],
    requests: list[tuple[str | None, str]],
    removals: list[Route],
) -> None:
    table = RouteTable(entries)
    expected = dict(entries)  # last service wins, like add()
    for route in removals:
        assert table.remove(route) == (expected.pop(route, None) is not None)
    assert len(table) == len(expected)
    assert sorted(table.routes(), key=str) == sorted(expected.items(), key=str)
    for host, raw in requests:
        match = table.lookup(host, raw)
        got = None if match is None else (match.route, match.service)
        assert got == _reference(list(expected.items()), host, raw), (host, raw)


# -- split_script_name -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "script_name", "expected"),
    [
        ("/app/x", "/app", ("/app", "/x")),
        ("/app", "/app", ("/app", "")),
        ("/app/", "/app", ("/app", "/")),
        ("/x", "", ("", "/x")),
        ("/x", "/", ("", "/x")),
        ("/", "", ("", "/")),
        ("/a%2Fb/c%20d", "/a%2Fb", ("/a/b", "/c d")),
        ("/app/caf%C3%A9", "/app", ("/app", "/caf\xc3\xa9")),  # latin-1, PEP 3333
    ],
)
def test_split_script_name(path: str, script_name: str, expected: tuple[str, str]) -> None:
    assert split_script_name(path, script_name) == expected


@pytest.mark.parametrize(("path", "script_name"), [("/apple", "/app"), ("/", "/app")])
def test_split_script_name_rejects_paths_outside(path: str, script_name: str) -> None:
    with pytest.raises(ValueError, match="not under"):
        split_script_name(path, script_name)


@settings(max_examples=200, deadline=None)
@given(_raw_paths, st.integers(min_value=0, max_value=4))
def test_split_script_name_recombines(raw: bytes | str, depth: int) -> None:
    path = normalize_path(raw)
    script_name = "/".join(path.rstrip("/").split("/")[: depth + 1])
    script, info = split_script_name(path, script_name)
    assert script + info == unquote_to_bytes(path).decode("latin-1")
    assert info == "" or info.startswith("/")
