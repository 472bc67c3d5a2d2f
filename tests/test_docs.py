"""The README and docs/ show only what works: every command parses, every config snippet loads.

Each ``signing-proxy`` (or ``python -m proxy``) line in a shell block is parsed by the real command
line parser, each ``bench/`` line by that script's own parser, and each YAML block that looks like a
config is loaded by the real config loader. A renamed flag or key fails here before a reader finds it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import parser as cli_parser
from proxy.config import parse_config
from tests.support.tls import Pki

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
CONFIG_KEYS = {"listen", "routes", "credentials", "forward", "cors", "admin_listen"}


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for language, body in BLOCK.findall(page.read_text()):
            if language == kind:
                found.append((page.relative_to(ROOT).as_posix(), body))
    return found


def command_lines() -> list[tuple[str, list[str]]]:
    """Every shell command of the docs, continuation lines joined, comments dropped."""
    lines = []
    for page, body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append((page, words))
    return lines


def proxy_arguments(words: list[str]) -> list[str] | None:
    """The arguments after the program, for a line that runs signing-proxy; None otherwise."""
    for index, word in enumerate(words):
        if word.endswith("signing-proxy") and not word.startswith("-"):
            return words[index + 1 : _end(words, index + 1)]
        if word.endswith("python") and words[index + 1 : index + 3] == ["-m", "proxy"]:
            return words[index + 3 : _end(words, index + 3)]
    return None


def _end(words: list[str], start: int) -> int:
    """Where one command ends in a line that chains several (``&&``, ``|``, ``;``)."""
    return next((i for i in range(start, len(words)) if words[i] in ("&&", "||", "|", ";")), len(words))


PROXY_COMMANDS = [(page, args) for page, words in command_lines() if (args := proxy_arguments(words)) is not None]
BENCH_COMMANDS = [
    (page, words[i], words[i + 1 : _end(words, i + 1)])
    for page, words in command_lines()
    for i, word in enumerate(words)
    if word.startswith("bench/") and word.endswith(".py")
]


def test_the_docs_show_commands_at_all() -> None:
    assert len(PROXY_COMMANDS) >= 5 and BENCH_COMMANDS


@pytest.mark.parametrize(("page", "arguments"), PROXY_COMMANDS, ids=[" ".join(a)[:60] for _, a in PROXY_COMMANDS])
def test_every_documented_proxy_command_parses(page: str, arguments: list[str]) -> None:
    try:
        cli_parser().parse_args(arguments)
    except SystemExit as error:  # argparse's way of refusing
        pytest.fail(f"{page}: `signing-proxy {' '.join(arguments)}` is refused by the CLI ({error})")


@pytest.mark.parametrize(
    ("page", "script", "arguments"), BENCH_COMMANDS, ids=[f"{s} {' '.join(a)}"[:60] for _, s, a in BENCH_COMMANDS]
)
def test_every_documented_bench_command_exists_with_its_flags(page: str, script: str, arguments: list[str]) -> None:
    path = ROOT / script
    assert path.is_file(), f"{page}: {script} does not exist"
    source = path.read_text()
    for flag in (word.split("=")[0] for word in arguments if word.startswith("--")):
        assert f'"{flag}"' in source, f"{page}: {script} has no {flag} option"


def _config_snippets() -> list[tuple[str, dict[str, Any]]]:
    snippets = []
    for page, body in blocks("yaml"):
        document = yaml.safe_load(body)
        if isinstance(document, dict) and CONFIG_KEYS & document.keys():
            snippets.append((page, document))
    return snippets


CONFIG_SNIPPETS = _config_snippets()


def test_the_docs_show_configs_at_all() -> None:
    assert len(CONFIG_SNIPPETS) >= 5


@pytest.mark.parametrize(("page", "document"), CONFIG_SNIPPETS, ids=[p for p, _ in CONFIG_SNIPPETS])
def test_every_documented_config_snippet_loads(
    page: str, document: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = yaml.safe_dump(document)
    for name in re.findall(r"\$\{(\w+)", text):  # ${VAR} placeholders get a plausible value
        monkeypatch.setenv(name, "12345" if "PORT" in name else "placeholder-value")
    document = dict(document)
    credentials = dict(document.get("credentials") or {})
    if "routes" not in document:  # a fragment showing credentials only: give it a route that uses them
        name = next(iter(credentials), "default")
        document["routes"] = [
            {"upstream": "https://abc123.execute-api.eu-west-1.amazonaws.com/prod", "credentials": name}
        ]
    for route in document["routes"]:  # a fragment showing routes only: the entries they name, from the default chain
        credentials.setdefault(route.get("credentials", "default"), {"type": "default"})
    credentials.pop("default", None)
    document["credentials"] = credentials
    parse_config(with_test_certificates(document, tmp_path))


def with_test_certificates(document: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The snippet with its certificate and key paths (which exist only on the reader's machine) made here."""
    pki = Pki.make(directory)
    client_cert, client_key = pki.client(password=b"placeholder-value")  # ${CLIENT_KEY_PASSWORD} above
    server = pki.ca.issue_cert("localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    made = {"ca_bundle": pki.ca_file, "client_cert": client_cert, "client_key": client_key}
    routes = [{**r, **{k: str(made[k]) for k in made if k in r}} for r in document["routes"]]
    if "listen_tls" in document:
        document = {**document, "listen_tls": {"cert": str(directory / "server.pem")}}
    return {**document, "routes": routes}
