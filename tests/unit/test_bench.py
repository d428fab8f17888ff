"""The bench's pure parts: target verdicts, the docs/benchmarks.md sections, py-spy parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import doc, long, run, targets, ws_echo
from bench.procs import BenchError
from bench.profile import parse_raw
from bench.report import Case, Results, Run, Settings, cpu_table, ratio_table, results_table
from bench.wrk import WrkResult

HELLO = {c: Case("hello (19 B)", "/", c) for c in (1, 16, 128)}
MIB = Case("1 MiB", "/bytes/1048576", 16)
CASES = [*HELLO.values(), MIB]


def _run(rps: float, p50_ms: float = 1.0, cpu: dict[str, float] | None = None) -> Run:
    return Run(WrkResult(requests_per_s=rps, p50_ms=p50_ms, p99_ms=2 * p50_ms,
                         requests=int(rps * 5), non_2xx=0, socket_errors=0), cpu or {})


def _results(subject_rps: float) -> Results:
    """granian 10k, gunicorn 4k, direct 30k req/s at every case; the subject as given."""
    results: Results = {}
    for case in CASES:
        results[case, "granian"] = [_run(10_000, 0.2)] * 3
        results[case, "gunicorn"] = [_run(4_000, 0.4)] * 3
        results[case, "direct"] = [_run(30_000, 0.1)] * 3
        cpu = {"mongrel2": 30.0, "relay": 8.0, "broker": 20.0, "pool": 0.0,
               "pool worker 1": 15.0, "pool worker 2": 20.0}
        results[case, targets.SUBJECT] = [_run(subject_rps, 0.2, cpu)] * 3
        results[case, targets.FC_OFF] = [_run(subject_rps * 1.05, 0.2)] * 3
    return results


def test_targets_met_when_the_numbers_meet_them() -> None:
    text = targets.summary(_results(12_500), CASES)
    lines = text.splitlines()
    assert lines[0].startswith("- **met**") and "1.25x granian, 3.12x gunicorn" in lines[0]
    assert lines[1].startswith("- **met**") and "(+100 µs)" in lines[1]
    assert lines[2].startswith("- **met**") and "WSGI workers 35 µs" in lines[2]
    assert lines[3].startswith("- **met**") and "+4.8%" in lines[3]
    assert lines[4].startswith("- **met**") and "c=16: 1.25x" in lines[4]
    assert "the ceiling: 30,000 req/s (3.00x granian)" in lines[1]  # what bounds the target
    assert "c=16: 1.25x (direct 3.00x)" in lines[4]


def test_targets_missed_when_the_numbers_fall_short() -> None:
    lines = targets.summary(_results(11_000), CASES).splitlines()
    assert lines[0].startswith("- **missed**") and "1.10x granian" in lines[0]
    assert lines[4].startswith("- **met**")  # 1.10x granian at 1 MiB is not slower
    lines = targets.summary(_results(9_000), CASES).splitlines()
    assert lines[1].startswith("- **missed**") and lines[4].startswith("- **missed**")


def test_memory_verdicts_come_from_the_long_section() -> None:
    assert "not measured yet" in targets.summary(_results(12_500), CASES).splitlines()[-1]
    long = "## Long checks\n\n- **met**: relay RSS flat\n- **missed**: broker RSS flat\n"
    lines = targets.summary(_results(12_500), CASES, long).splitlines()
    assert lines[-2:] == ["- (last `make bench-long`, section below) **met**: relay RSS flat",
                          "- (last `make bench-long`, section below) **missed**: broker RSS flat"]


def test_bench_long_puts_its_verdicts_into_the_summary_above(tmp_path: Path) -> None:
    main = "# main\n\n" + targets.summary(_results(12_500), CASES) + "\n\nmore text\n"
    path = tmp_path / "benchmarks.md"
    path.write_text(doc.merge("", main, {"long": "- **met**: old"}))
    assert long.refresh_verdicts(path)  # "not measured yet" -> the section's verdict
    doc.write(path, updates={"long": "- **met**: relay flat\n- **missed**: broker flat"})
    assert long.refresh_verdicts(path)
    text = path.read_text()
    assert text.count("(last `make bench-long`") == 2 and "old" not in text
    assert "section below) **missed**: broker flat\n\nmore text" in text
    path.write_text("# no summary here\n")
    assert not long.refresh_verdicts(path)


def test_targets_not_measured_say_so() -> None:
    results = {k: v for k, v in _results(12_500).items() if k[1] != "granian"}
    lines = targets.summary(results, CASES).splitlines()
    assert lines[0].endswith("not measured in this run")
    assert lines[4].endswith("not measured in this run")


def test_cpu_table_has_every_process_and_the_total() -> None:
    table = cpu_table(_results(12_500), CASES, [targets.SUBJECT])
    assert "| scale0+relay | pool worker 2 | 20 | 20 | 20 | 20 |" in table
    assert "| scale0+relay | **all server processes** | 93 | 93 | 93 | 93 |" in table


def test_bench_keeps_the_long_and_profile_sections() -> None:
    old = doc.merge("", "# old main\n", {"long": "long body", "profile": "profile body"})
    new = doc.merge(old, "# new main\n")
    assert new.startswith("# new main\n") and "# old main" not in new
    assert doc.sections(new) == doc.sections(old)
    assert "long body" in new and "profile body" in new
    again = doc.merge(new, updates={"profile": "second profile"})
    assert again.startswith("# new main\n")
    assert "second profile" in again and "profile body" not in again and "long body" in again


def test_parse_raw_counts_own_and_inclusive_samples() -> None:
    raw = ("main (a.py:1);loop (a.py:5);poll (zmq/sugar/poll.py:3) 6\n"
           "main (a.py:1);loop (a.py:6);send (/x/site-packages/zmq/s.py:9) 3\n"
           "main (a.py:1);loop (a.py:7) 1\n")
    profile = parse_raw(raw, "broker")
    assert profile.samples == 10
    assert profile.own == [("poll (zmq/sugar/poll.py)", 6), ("send (zmq/s.py)", 3),
                           ("loop (a.py)", 1)]
    assert ("main (a.py)", 10) not in profile.inclusive  # on every stack: an entry point
    assert profile.inclusive[0] == ("poll (zmq/sugar/poll.py)", 6)


def test_ws_echo_summary_rate_and_nearest_rank_percentiles() -> None:
    result = ws_echo.summarize([float(n) for n in range(100, 0, -1)], 2.0, errors=3)
    assert result == ws_echo.EchoResult(messages=100, messages_per_s=50.0, p50_ms=50.0,
                                         p99_ms=99.0, errors=3)
    empty = ws_echo.summarize([], 1.0, errors=1)
    assert empty.messages == 0 and empty.messages_per_s == 0.0 and math.isnan(empty.p50_ms)


def test_ws_echo_result_line_round_trips_and_bad_output_is_an_error() -> None:
    result = ws_echo.EchoResult(messages=7, messages_per_s=3.5, p50_ms=1.25, p99_ms=4.0,
                                errors=0)
    assert ws_echo.parse("noise\n" + ws_echo.to_line(result) + "\n") == result
    with pytest.raises(BenchError, match="no result"):
        ws_echo.parse("Traceback ...\n")
    with pytest.raises(BenchError, match="cannot read"):
        ws_echo.parse('{"messages": 1}\n')


def test_new_scenarios_run_only_the_hello_cases_and_asgi_the_ws_echo() -> None:
    hello = [c for c in run.CASES if c.path == "/"]
    assert [c.connections for c in hello] == [1, 16, 128]
    for name in (targets.REPLIES, targets.ASGI, "uvicorn", "granian asgi"):
        assert run.cases_of(name) == hello
    assert run.cases_of(targets.SUBJECT) == run.CASES
    assert run.ws_cases_of(targets.ASGI) == run.WS_CASES and not run.ws_cases_of("granian")
    settings = Settings(duration_s=5, runs=3, wrk_threads=2)
    # 3 hello cases + 1 ws echo case, each 3 runs of 5 s + 1 s warm-up
    assert run.planned_load_s([targets.ASGI], settings) == 4 * 16
    assert run.planned_load_s([targets.SUBJECT, targets.REPLIES], settings) == (7 + 3) * 16


def test_ratio_against_a_scenario_without_the_case_is_a_dash() -> None:
    results: Results = {(case, targets.SUBJECT): [_run(1000)] for case in CASES}
    results[HELLO[16], targets.REPLIES] = [_run(800)]
    lines = ratio_table(results, CASES, targets.SUBJECT, [targets.REPLIES]).splitlines()
    assert lines[0] == "| payload | c | scale0+relay req/s | / scale0+relay-replies |"
    assert lines[3] == "| hello (19 B) | 16 | 1,000 | 1.25x |"
    assert lines[2].endswith("| - |") and lines[5].endswith("| - |")


def test_ws_results_table_counts_messages_and_the_doc_has_the_asgi_section() -> None:
    ws = Case("ws echo (23 B)", "/ws", 16)
    results: Results = {(ws, targets.ASGI): [_run(2000, 5.0, {"broker": 40.0})]}
    table = results_table(results, [ws], [targets.ASGI, "uvicorn"], unit="msg")
    assert table.splitlines()[0].startswith("| payload | c | scenario | msg/s |")
    assert table.splitlines()[0].endswith("| server CPU µs/msg |")
    assert table.splitlines()[2] == ("| ws echo (23 B) | 16 | scale0 asgi | 2,000 | 5.00 "
                                     "| 10.0 | 0 | 40 |")
    asgi = doc.AsgiTables(ratios="RATIOS", results="ASGI-RESULTS", cpu="ASGI-CPU",
                          ws=table, ws_cpu="WS-CPU")
    text = doc.render(machine="M", settings=Settings(1, 1, 2), cpus="2",
                      plan=doc.Plan(cells=33, warmups=33, load_s=66, default_load_s=528,
                                    ws_connections=16),
                      no_control_socket=False, summary="S", ratios="R", results="T", cpu="C",
                      runs="RUNS", memory="MEM", runtime_s=90.0, asgi=asgi)
    assert "528 s of load" in text and "16 connections" in text
    after = text.split("## ASGI\n", 1)[1]
    assert after.index("RATIOS") < after.index("ASGI-RESULTS") < after.index("ASGI-CPU")
    assert after.index("### WebSocket echo\n\n" + table) < after.index("WS-CPU")
