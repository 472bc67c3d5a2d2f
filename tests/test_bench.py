"""bench/ still runs against this checkout: one short shape, with this checkout as its own --baseline.

The benchmark is not run by the tests for its figures (timing on a shared machine proves nothing);
this only keeps its plumbing (nginx with an openssl certificate, wrk, proxies of two checkouts, the
report) from rotting while proxy/ changes under it. With awslabs' Go ``aws-sigv4-proxy`` on PATH
(or its binary named by ``BENCH_GO_PROXY``) the small-GET shape also runs with it as a target.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = all(map(shutil.which, ("wrk", "nginx", "openssl")))
GO_PROXY = os.environ.get("BENCH_GO_PROXY") or shutil.which("aws-sigv4-proxy")
GO = "Go aws-sigv4-proxy"


@pytest.mark.skipif(not TOOLS, reason="wrk, nginx and openssl needed")
def test_bench_runs_the_tls_and_forward_shapes_against_a_baseline() -> None:
    command = [sys.executable, "bench/run.py", "--shapes", "tls,forward,unsigned", "--duration", "1", "--slices", "1"]
    command += ["--upload-size", "4MiB", "--stream-rounds", "1"]
    # A shell that exports AWS_CA_BUNDLE (to the public CAs) must not keep the proxies from trusting nginx.
    env = {**os.environ, "AWS_CA_BUNDLE": certifi.where()}
    result = subprocess.run(
        [*command, "--baseline", str(ROOT), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markdown, _, document = result.stdout.partition("\n{")
    shape = json.loads("{" + document)["shapes"][0]
    assert set(shape["rows"]) - {GO} == {"direct", "proxy", "baseline"}  # the Go proxy's if on PATH
    for row in shape["rows"].values():
        assert row["errors"] == 0 and row["rps"] > 0  # the proxies trusted the upstream's certificate
    assert "| small GET, TLS upstream | req/s |" in markdown
    forward = json.loads("{" + document)["shapes"][1]  # CONNECT, TLS with the local CA, GETs inside
    assert set(forward["rows"]) == {"direct", "proxy", "reverse mode, same proxy"}
    for row in forward["rows"].values():
        assert row["errors"] == 0 and row["rps"] > 0
    uploaded = json.loads("{" + document)["shapes"][2]  # checked whole by the client, else the bench fails
    assert set(uploaded["rows"]) == {"direct", "proxy"} and uploaded["rows"]["proxy"]["mb_s"] > 0


@pytest.mark.skipif(not (TOOLS and GO_PROXY), reason="wrk, nginx, openssl and aws-sigv4-proxy needed")
def test_bench_runs_the_go_proxy_beside_the_proxy() -> None:
    command = [sys.executable, "bench/run.py", "--shapes", "get", "--duration", "1", "--slices", "1"]
    result = subprocess.run(
        [*command, "--go-proxy", str(GO_PROXY), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markdown, _, document = result.stdout.partition("\n{")
    shape = json.loads("{" + document)["shapes"][0]
    assert set(shape["rows"]) == {"direct", "proxy", "proxy, access log on", GO}
    for row in shape["rows"].values():
        assert row["errors"] == 0 and row["rps"] > 0  # it signed and reached nginx, every time
    assert f"proxy / {GO}: " in markdown and "x Go |" in markdown  # the note and the summary's ratio
