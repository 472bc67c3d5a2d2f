"""Access lines written straight into the batched stderr buffer match what ``logging`` would write.

Each case runs in a fresh interpreter whose stderr (fd 2) is a file: ``setup_logging``
replaces the root handlers and levels, which must not leak into other tests, and the
batched handler writes to a duplicate of fd 2. Which path wrote a line is told by a
log record factory that notes every record made: the direct path makes none.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from proxy.ops import logs
from proxy.ops.logs import Exchange

ROOT = Path(__file__).resolve().parents[2]
ACCESS = "signing_proxy.access"
# Whole seconds plus an exact binary fraction, so LogRecord (time.time, or time.time_ns
# on Python 3.13+) and the direct path see the same milliseconds.
T0_NS = 1_795_328_292_375_000_000

MS = 1_000_000  # nanoseconds
DAY = 86_400_000 * MS
CASES = [  # (nanoseconds since the epoch, exchange, with query values)
    (T0_NS, Exchange("GET", "/", "/orders/7", "user=alice&token=abc", 200, 0.01234, 3, 512, 0.00812, "s AKID…"), False),
    (T0_NS, Exchange("GET", "/", "/orders/7", "user=alice&token=abc&flag", 200, 0.01234, 3, 512, 0.0081, "s A…"), True),
    (T0_NS + 500 * MS, Exchange("POST", "/api", "/x/y", "", 502, 0.5, 10, 0, None, "-", "upstream_connect"), False),
    (T0_NS + 1000 * MS, Exchange("PUT", "/", "/café/☃/日本", "ключ=значение", 201, 0.0012501, 0, 7, 0.0), True),
    (T0_NS + 1125 * MS, Exchange("GET", "/", "/café/☃", "ключ=значение&x=1", 200, 2.5, 0, 0, 1e-05), False),
    (T0_NS + DAY, Exchange("DELETE", "/r", '/a"b\\c\td', "", 499, 30.0, 0, 0, None, "p ASIA…", 'e"x'), False),
    (T0_NS + DAY, Exchange("GET", "/r", "/bad\udcffsurrogate", "", 404, 0.000049, 0, 0, 0.00004999), False),
]


def run_child(scenario: str, *args: str) -> tuple[str, object]:
    """Run ``scenario(*args)`` of this module in a new interpreter: (its stderr, what it printed as JSON)."""
    code = f"import sys; from tests.ops import test_access_log as t; t.{scenario}(*sys.argv[1:])"
    env = {"AWS_EC2_METADATA_DISABLED": "true", "TZ": "XST-5:30", "PYTHONPATH": str(ROOT), "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stderr.decode(), json.loads(result.stdout)


def count_records() -> list[str]:
    """Names of the loggers of every LogRecord made from now on."""
    names: list[str] = []
    make = logging.getLogRecordFactory()

    def counted(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make(*args, **kwargs)
        names.append(record.name)
        return record

    logging.setLogRecordFactory(counted)
    return names


def batched_handler() -> logs.BatchedStderrHandler:
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logs.BatchedStderrHandler)
    return handler


def write_cases(log_format: str, through_logging: str) -> None:
    """Child: every case through a batched handler, directly or (a no-op filter) through logging."""
    if through_logging == "yes":
        logs.access_log.addFilter(lambda record: True)
    records = count_records()
    logs.setup_logging("info", log_format, batched=True)
    for now_ns, exchange, with_query_values in CASES:
        time.time_ns = lambda now_ns=now_ns: now_ns  # type: ignore[misc]
        time.time = lambda now_ns=now_ns: now_ns / 1e9  # type: ignore[misc]
        logs.log_access(exchange, with_query_values=with_query_values)
    batched_handler().flush_now()
    print(json.dumps(records))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_direct_lines_are_byte_identical_to_logging_lines(log_format: str) -> None:
    direct, direct_records = run_child("write_cases", log_format, "no")
    reference, reference_records = run_child("write_cases", log_format, "yes")
    assert direct_records == [] and reference_records == [ACCESS] * len(CASES)
    assert direct == reference
    lines = direct.splitlines()
    assert len(lines) == len(CASES)
    if log_format == "json":
        entries = [json.loads(line) for line in lines]
        assert entries[0]["time"] == "2026-11-22T06:18:12.375Z" and entries[2]["time"].endswith(":12.875Z")
        assert entries[3]["path"] == "/café/☃/日本?ключ=значение" and entries[4]["path"] == "/café/☃?ключ=…&x=…"
        assert entries[5]["error"] == 'e"x' and entries[5]["upstream_ttfb_ms"] is None
    else:  # local time, 05:30 ahead of UTC
        assert lines[0].startswith("2026-11-22 11:48:12,375 INFO signing_proxy.access: / GET /orders/7?user=…&token=… ")
        assert lines[1].endswith(" /orders/7?user=alice&token=abc&flag 200 12.3ms in=3 out=512 ttfb=8.1ms creds=s A…")
        assert lines[2].endswith(" ttfb=- creds=- error=upstream_connect")
        assert lines[3].startswith("2026-11-22 11:48:13,375 ") and lines[4].startswith("2026-11-22 11:48:13,500 ")
        # the duration is rounded twice, as ever: to 2 places, then shown with 1
        assert " 201 1.2ms in=0 out=7 ttfb=0.0ms " in lines[3] and "/bad\\udcffsurrogate 404 0.1ms" in lines[6]
        assert lines[6].startswith("2026-11-23 11:48:12,375 ")


TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
TEXT_ACCESS = re.compile(TIME + r" INFO signing_proxy\.access: / GET /p 200 1\.0ms in=(\d+) out=0 ttfb=- creds=-")
TEXT_WARNING = re.compile(TIME + r" WARNING signing_proxy\.other: warning (\d+)")


def numbered(number: int) -> Exchange:
    return Exchange("GET", "/", "/p", status=200, duration=0.001, bytes_in=number)


def interleave(count: str) -> None:
    """Child: access lines and warnings alternating, then from two threads at once."""
    records = count_records()
    logs.setup_logging("info", "text", batched=True)
    other = logging.getLogger("signing_proxy.other")

    half_written, warning_written = threading.Event(), threading.Event()

    # The threads are made to overlap (half the access lines, then a warning, then both at once),
    # so that the lines mix however the machine schedules them.
    def access_lines() -> None:
        for number in range(int(count)):
            if number == int(count) // 2:
                half_written.set()
                warning_written.wait(10)
            logs.log_access(numbered(number), with_query_values=False)

    def warnings() -> None:
        half_written.wait(10)
        for number in range(int(count)):
            other.warning("warning %d", number)
            warning_written.set()

    for number in range(3):
        logs.log_access(numbered(number), with_query_values=False)
        other.warning("warning %d", number)
    threads = [threading.Thread(target=access_lines), threading.Thread(target=warnings)]
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batched_handler().flush_now()
    print(json.dumps(sorted(set(records))))


def test_access_lines_and_other_lines_come_out_whole_and_in_order() -> None:
    count = 20_000
    err, records = run_child("interleave", str(count))
    assert records == ["signing_proxy.other"]  # the access lines took the direct path
    lines = err.splitlines()
    kinds = [("access" if TEXT_ACCESS.fullmatch(line) else "warning" if TEXT_WARNING.fullmatch(line) else line)
             for line in lines]  # fmt: skip
    assert kinds[:6] == ["access", "warning"] * 3
    assert set(kinds) == {"access", "warning"}  # no line cut into or run together with another
    numbers = {kind: [int(m.group(1)) for line in lines if (m := pattern.fullmatch(line))]
               for kind, pattern in (("access", TEXT_ACCESS), ("warning", TEXT_WARNING))}  # fmt: skip
    assert numbers["access"] == [0, 1, 2, *range(count)] and numbers["warning"] == numbers["access"]
    assert 6 < kinds.index("warning", 6) < len(kinds) - count  # the threads' lines did mix


def reconfigure() -> None:
    """Child: which path each logging set-up gets, by the records an access line makes."""
    records = count_records()
    exchange = Exchange("GET", "/", "/p", status=200)

    def records_of_one_line() -> int:
        before = len(records)
        logs.log_access(exchange, with_query_values=False)
        return len(records) - before

    counts = {}
    logs.setup_logging("info", "json", batched=True)
    counts["batched"] = records_of_one_line()
    caught: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = caught.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(catcher)  # as pytest's caplog does
    counts["handler added"] = records_of_one_line()
    counts["caught"] = len(caught)
    logging.getLogger().removeHandler(catcher)
    counts["handler removed"] = records_of_one_line()
    logs.setup_logging("info", "text", batched=False)
    counts["not batched"] = records_of_one_line()
    logging.getLogger("signing_proxy").addHandler(catcher)
    logs.setup_logging("info", "text", batched=True)
    counts["second handler on the way"] = records_of_one_line()
    logging.getLogger("signing_proxy").removeHandler(catcher)
    logs.setup_logging("info", "text", batched=True)
    counts["batched again"] = records_of_one_line()
    batched_handler().flush_now()
    print(json.dumps(counts))


def test_each_setup_picks_the_path_again_and_added_handlers_get_records() -> None:
    err, counts = run_child("reconfigure")
    assert counts == {
        "batched": 0,
        "handler added": 1,
        "caught": 1,
        "handler removed": 0,
        "not batched": 1,
        "second handler on the way": 1,
        "batched again": 0,
    }
    assert len(err.splitlines()) == 6  # each line reached stderr once, whichever way it went
