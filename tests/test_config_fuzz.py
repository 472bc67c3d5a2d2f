"""Fuzzing the configuration loader: only ConfigError may escape, and the CLI exits 2 without a traceback.

hypothesis feeds ``parse_config`` arbitrary nested structures and mutations of a
valid configuration, and ``load_config`` arbitrary YAML text. Whatever is
accepted must be usable: every route's derived values computable, every
duration a finite positive number. Inputs that once hit a bug (non-UTF-8
files, deep nesting, NaN durations, bad ports, alias bombs) are pinned by the
tests at the end.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import resource
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import Config, ConfigError, load_config, parse_config
from proxy.demo import free_port
from tests.test_cli import ROOT

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "admin_listen": "127.0.0.1:0",
    "log_level": "info",
    "max_body": "1MiB",
    "shutdown_grace": "5s",
    "credentials": {
        "keys": {"type": "static", "access_key_id": "AKIDFUZZ", "secret_access_key": "fuzz/secret"},
        "role": {"type": "assume_role", "role_arn": "arn:aws:iam::123456789012:role/r", "source": "keys"},
        "prof": {"type": "profile", "profile": "dev"},
    },
    "routes": [
        {"path_prefix": "/a", "upstream": "https://a.execute-api.eu-west-1.amazonaws.com/prod", "credentials": "role"},
        {"upstream": "http://127.0.0.1:9000/x", "region": "eu-west-1", "timeout": "2s", "idle_timeout": "1m"},
    ],
}
KEYS = sorted(
    {*Config.model_fields, "type", "profile", "role_arn", "source", "duration_seconds", "region", "endpoint_url",
     "path_prefix", "upstream", "service", "credentials", "auth", "api_key", "timeout", "connect_timeout",
     "first_byte_timeout", "idle_timeout", "user_pool_id", "client_id", "identity_pool_id", "username"}
)  # fmt: skip
# Values near what the validators parse.
NEAR = [
    "", " ", "0", "-1", "1.5", "30s", "0s", "-5s", "250ms", "1e3", "99999999999999999999h", "10MiB", "-1KB", "1.5GiB",
    "127.0.0.1:8080", "[::1]:1", "[::1", ":80", "localhost:", "0.0.0.0:65535", "65536", "/", "//", "/a/../..",
    "http://", "https://h", "http://h/p?q=1", "ftp://h", "http://[::1]:80/", "http://h:0", "http://h:65535/x",
    "http://h:65536", "http://h:99999/x", "http://h:port", "http://[::1", "https://h:-1",
    "${HOME}", "${NOT_SET_FOR_FUZZ}", "${NOT_SET_FOR_FUZZ:-30s}", "$", "${", "auto", "sigv4", "none", "debug",
    "static", "assume_role", "cognito", "cognito_guest", "default", "profile", "eu-west-1", "eu-west-1_abc",
    "arn:aws:iam::123456789012:role/x", "\x00", "é", "😀", "\ud7ff",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities included: they were once accepted as durations
    st.text(max_size=20),
    st.sampled_from(NEAR),
    st.binary(max_size=8),  # what !!binary gives
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.none(), st.booleans())
trees = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=25,
)


def check_usable(config: Config) -> None:
    """What the proxy computes from an accepted configuration must not raise."""
    for value in (config.max_body, config.listen[1]):
        assert value >= 0
    durations = [config.shutdown_grace]
    for route in config.routes:
        route.upstream_scheme, route.upstream_host, route.upstream_path, route.resolved_region  # noqa: B018
        durations += [route.timeout, route.connect_timeout, route.first_byte_timeout, route.idle_timeout]
        assert route.credentials in {"default", *config.credentials}
    for value in durations:
        assert value is None or (math.isfinite(value) and value > 0), durations


def parse_or_refuse(data: Any) -> None:
    try:
        config = parse_config(data)
    except ConfigError as error:
        assert str(error).strip(), "a ConfigError must say what is wrong"
        assert "Traceback" not in str(error)
        return
    check_usable(config)


@FUZZ
@given(data=st.one_of(trees, st.dictionaries(keys, trees, max_size=6)))
def test_parse_config_arbitrary_structures(data: Any) -> None:
    parse_or_refuse(data)


def paths_of(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths_of(value, (*prefix, index))
    return found


def replaced(tree: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        copy = dict(tree)
        if delete and not rest:
            copy.pop(head, None)
        else:
            copy[head] = replaced(tree[head], rest, value, delete) if rest else value
        return copy
    copy = list(tree)
    if delete and not rest:
        del copy[head]
    else:
        copy[head] = replaced(tree[head], rest, value, delete)
    return copy


@FUZZ
@given(data=st.data())
def test_parse_config_mutations_of_a_valid_config(data: st.DataObject) -> None:
    """Up to three edits (replace any sub-tree, delete any key, add any key) to a configuration that is valid."""
    parse_config(VALID)  # the starting point is accepted
    tree: Any = VALID
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(paths_of(tree)), label="path")
        action = data.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
        if action == "add":
            mappings = [p for p in paths_of(tree) if isinstance(lookup(tree, p), dict)]
            if not mappings:
                continue
            path = (*data.draw(st.sampled_from(mappings)), data.draw(keys, label="new key"))
            action = "replace"
        if action == "delete" and not path:
            continue
        tree = replaced(tree, path, data.draw(trees, label="value"), delete=action == "delete")
    parse_or_refuse(tree)


def lookup(tree: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


yaml_texts = st.one_of(
    trees.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True)),
    st.just(yaml.safe_dump(VALID)).flatmap(
        lambda text: st.tuples(st.integers(0, len(text)), st.integers(0, 20), st.text(max_size=20)).map(
            lambda edit: text[: edit[0]] + edit[2] + text[edit[0] + edit[1] :]
        )
    ),
    st.text(alphabet="{}[]:,-?!&*|>'\"#%@`\n\t abc019.$", max_size=200),
)
yaml_files = st.one_of(
    yaml_texts.map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),  # not UTF-8, BOMs, NULs (deep nesting: test_deeply_nested_config_is_a_config_error)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=yaml_files)
def test_load_config_arbitrary_yaml(content: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as error:
        assert str(error).strip() and "Traceback" not in str(error)
        return
    check_usable(config)


# ---------------------------------------------------------------- the command line, on a sample


def fuzzed_files(count: int, seed: int) -> list[str]:
    """YAML files that are refused in-process with a ConfigError (so the CLI must exit 2)."""
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < count:
        tree = mutate_randomly(VALID, rng)
        text = yaml.safe_dump(tree, allow_unicode=True)
        if rng.random() < 0.3:
            at = rng.randrange(len(text))
            junk = rng.choice(["{", "]", ": :", "\t", "&a", "*b", "!!python/object:os.system", "'"])
            text = text[:at] + junk + text[at:]
        try:
            parse_config(yaml.safe_load(text))
        except ConfigError:
            texts.append(text)
        except yaml.YAMLError:
            texts.append(text)
    return texts


def mutate_randomly(tree: Any, rng: random.Random) -> Any:
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths_of(tree)[1:])
        value = rng.choice([*NEAR, None, True, 0, -1, 2**65, 1.5, [], {}, ["x"], {"k": "v"}])
        tree = replaced(tree, path, value, delete=rng.random() < 0.3)
    return tree


async def run_config(path: Path, timeout: float = 30) -> tuple[int, str]:
    """``python -m proxy run --config path`` (at most 2 GiB of memory, ``timeout`` seconds); (status, stderr)."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=os.environ.copy(),
        preexec_fn=limit_memory,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -9, f"still running after {timeout}s"
    assert process.returncode is not None
    return process.returncode, err.decode(errors="replace")


async def test_cli_exits_2_without_traceback_on_fuzzed_files(tmp_path: Path) -> None:
    files = []
    for n, text in enumerate(fuzzed_files(10, seed=11)):
        path = tmp_path / f"fuzzed-{n}.yaml"
        path.write_text(text)
        files.append(path)
    results = await asyncio.gather(*(run_config(path) for path in files))
    for path, (code, err) in zip(files, results, strict=True):
        assert code == 2, f"{path.read_text()!r}: exit {code}: {err[-2000:]}"
        assert "Traceback" not in err, err
        assert err.startswith("signing-proxy: configuration error:"), err


# ---------------------------------------------------------------- bugs this file found, pinned


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"routes: [{upstream: 'http://h', region: r, path_prefix: '/caf\xe9'}]\n")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("where", ["yaml", "structure"])
def test_deeply_nested_config_is_a_config_error(where: str, tmp_path: Path) -> None:
    if where == "yaml":
        path = tmp_path / "deep.yaml"
        path.write_text("routes: " + "[" * 5000 + "]" * 5000 + "\n")
        with pytest.raises(ConfigError):
            load_config(path)
    else:
        deep: Any = "x"
        for _ in range(5000):
            deep = [deep]
        with pytest.raises(ConfigError):
            parse_config({"routes": deep})


@pytest.mark.parametrize("key", ["timeout", "first_byte_timeout", "idle_timeout"])
def test_nan_durations_are_refused(key: str) -> None:
    with pytest.raises(ConfigError):
        parse_config({"routes": [{"upstream": "http://h", "region": "r", key: float("nan")}]})


@pytest.mark.parametrize("upstream", ["http://127.0.0.1:99999", "http://127.0.0.1:port"])
def test_upstream_port_out_of_range_is_a_config_error(upstream: str) -> None:
    with pytest.raises(ConfigError):
        check_usable(parse_config({"routes": [{"upstream": upstream, "region": "eu-west-1"}]}))


LAUGHS = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


async def test_cli_refuses_nested_aliases_quickly(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS + f"listen: 127.0.0.1:{free_port()}\nroutes: []\n")
    code, err = await run_config(path, timeout=5)
    assert code == 2, f"exit {code}: {err[-500:]}"
    assert "Traceback" not in err
