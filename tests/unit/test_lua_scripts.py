"""The Lua scripts: documented, cluster-safe key use, and valid Lua for Redis.

The static checks are heuristics over the source text (the scripts are small and
written in a plain style); the syntax check loads every script into the session
redis-server from tests/conftest.py with SCRIPT LOAD.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pytest
import redis

from gateway.storage.keys import stream_keys
from gateway.storage.scripts import (
    OPERATIONS,
    QUOTA_OPERATIONS,
    STREAM_OPERATIONS,
    Script,
    Scripts,
    read_lua,
)

SCRIPTS = Scripts()
# Scripts() prepends _lib.lua and a newline to each operation's file.
LIB = read_lua("_lib") + "\n"


def _body(script: Script) -> str:
    if script.name in QUOTA_OPERATIONS:  # these stand alone
        assert "local function" not in script.source
        return script.source
    assert script.source.startswith(LIB)
    return script.source[len(LIB) :]


# Commands the scripts may call, and which argument positions (1-based, after the
# command name) are key names. None means every argument is a key.
KEY_POSITIONS: dict[str, tuple[int, ...] | None] = {
    "TIME": (),
    "PUBLISH": (),  # a channel, not a key
    "HGETALL": (1,),
    "HGET": (1,),
    "HSET": (1,),
    "HDEL": (1,),
    "HINCRBY": (1,),
    "XADD": (1,),
    "XRANGE": (1,),
    "XLEN": (1,),
    "PEXPIREAT": (1,),
    "PERSIST": (1,),
    "SADD": (1,),
    "SREM": (1,),
    "XTRIM": (1,),
    "DEL": None,
    "GET": (1,),
    "SET": (1,),
    "PEXPIRE": (1,),
    "PTTL": (1,),
    "ZADD": (1,),
    "ZCARD": (1,),
    "ZRANGE": (1,),
    "ZREMRANGEBYSCORE": (1,),
}


def _strip_comments(source: str) -> str:
    return "\n".join(re.sub(r"--.*$", "", line) for line in source.splitlines())


def _call_args(source: str, start: int) -> tuple[list[str], int]:
    """Top-level comma-separated arguments of the call whose '(' is at start."""
    depth, quote, args, current = 0, "", [], ""
    i = start + 1
    while i < len(source):
        ch = source[i]
        if quote:
            current += ch
            if ch == "\\":
                current += source[i + 1]
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current += ch
        elif ch in "([{":
            depth += 1
            current += ch
        elif ch in ")]}":
            if depth == 0:
                args.append(current.strip())
                return [a for a in args if a], i
            depth -= 1
            current += ch
        elif ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += ch
        i += 1
    raise AssertionError(f"unbalanced call at {start}")


def _calls(source: str, function: str) -> Iterator[tuple[int, list[str]]]:
    for match in re.finditer(rf"(?<![\w.]){re.escape(function)}\s*\(", source):
        if re.search(r"function\s+$", source[: match.start()]):
            continue  # the definition, not a call
        args, _ = _call_args(source, match.end() - 1)
        yield match.start(), args


def _keys_locals(body: str) -> set[str]:
    """Names bound to KEYS elements: `local a, b = KEYS[1], KEYS[2]`."""
    names: set[str] = set()
    for match in re.finditer(r"^local\s+([\w\s,]+?)\s*=\s*(.+)$", body, re.M):
        targets = [t.strip() for t in match.group(1).split(",")]
        values = [v.strip() for v in match.group(2).split(",")]
        for target, value in zip(targets, values, strict=False):
            if re.fullmatch(r"KEYS\[\w+\]", value):
                names.add(target)
    return names


def _lib_functions(lib: str) -> list[tuple[int, str, list[str]]]:
    return [
        (m.start(), m.group(1), [p.strip() for p in m.group(2).split(",") if p.strip()])
        for m in re.finditer(r"local function (\w+)\(([^)]*)\)", lib)
    ]


def _is_key_expr(expr: str, names: set[str]) -> bool:
    """KEYS[...] (a number, a name or arithmetic on them), a name bound to KEYS,
    or such a name indexed (a KEYS table); or a table of such expressions."""
    if expr.startswith("{") and expr.endswith("}"):
        parts = [part.strip() for part in expr[1:-1].split(",")]
        return all(_is_key_expr(part, names) for part in parts)
    if re.fullmatch(r"KEYS\[[\w\s*+-]+\]", expr):
        return True
    match = re.fullmatch(r"(\w+)(?:\[\w+\])?", expr)
    return bool(match) and match.group(1) in names


def _lib_key_params() -> dict[str, list[int]]:
    """For each lib helper, the positions of parameters used as key names."""
    lib = _strip_comments(LIB)
    functions = _lib_functions(lib)
    result: dict[str, list[int]] = {}
    for index, (start, name, params) in enumerate(functions):
        end = functions[index + 1][0] if index + 1 < len(functions) else len(lib)
        used: set[str] = set()
        for _, args in _calls(lib[start:end], "redis.call"):
            command = args[0].strip("'\"").upper()
            for arg in _key_args(command, args[1:]):
                match = re.fullmatch(r"(\w+)(?:\[\w+\])?", arg)
                assert match and match.group(1) in params, (
                    f"_lib.lua {name}(): redis.call('{command}') key {arg!r} "
                    "is not a parameter of the helper"
                )
                used.add(match.group(1))
        if used:
            result[name] = [params.index(p) for p in used]
    return result


def _key_args(command: str, args: list[str]) -> list[str]:
    assert command in KEY_POSITIONS, f"add redis.call('{command}') to KEY_POSITIONS"
    positions = KEY_POSITIONS[command]
    if positions is None:
        return args
    return [args[p - 1] for p in positions if p - 1 < len(args)]


def _header(body: str) -> list[str]:
    lines = body.lstrip("\n").splitlines()
    header = []
    for line in lines:
        if not line.startswith("--"):
            break
        header.append(line)
    return header


def _section(header: list[str], name: str) -> str:
    """Text of the `-- NAME:` entry including its continuation lines."""
    text, inside = [], False
    for line in header:
        content = line[2:].strip()
        if re.match(r"(KEYS|ARGV|Reply):", content):
            inside = content.startswith(f"{name}:")
        if inside:
            text.append(content)
    return " ".join(text)


def _scripts() -> list[Script]:
    return SCRIPTS.all()


SCRIPT_IDS = [s.name for s in SCRIPTS.all()]


# -- loading ------------------------------------------------------------------------


def test_every_operation_has_a_script() -> None:
    assert [s.name for s in SCRIPTS.all()] == list(OPERATIONS)
    for name in OPERATIONS:
        assert getattr(SCRIPTS, name).name == name


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_script_is_lib_plus_its_own_file(script: Script) -> None:
    assert "local function now_ms()" in LIB
    assert _body(script).lstrip("\n").startswith(f"-- {script.name}.lua:")
    assert script.sha == hashlib.sha1(script.source.encode()).hexdigest()


# -- header comments -------------------------------------------------------------------


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_header_documents_keys_and_reply(script: Script) -> None:
    header = _header(_body(script))
    assert _section(header, "KEYS"), f"{script.name}.lua has no '-- KEYS:' line"
    assert _section(header, "Reply"), f"{script.name}.lua has no '-- Reply:' line"
    if script.name in QUOTA_OPERATIONS:
        # One key of one principal (gateway/storage/keys.py: rate_key, live_readers_key).
        assert re.match(r"KEYS: 1 the principal's [\w-]+ (key|set)\b", _section(header, "KEYS"))
        return
    assert script.name in STREAM_OPERATIONS
    # The gateway passes StreamKeys.all: meta, data, producers, in that order
    # (append.lua takes the first three for each of several streams).
    assert re.match(
        r"KEYS: (1 meta, 2 data, 3 producers|3 per stream, .*: meta, data, producers)\b",
        _section(header, "KEYS"),
    )


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_header_documents_every_argv_used(script: Script) -> None:
    body = _strip_comments(_body(script))
    used = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    argv = _section(_header(_body(script)), "ARGV")
    if "ARGV" not in body:
        return  # fork_release.lua takes no arguments
    assert argv, f"{script.name}.lua uses ARGV but has no '-- ARGV:' line"
    documented = {int(n) for n in re.findall(r"(?:^|[:,]\s*)(\d+)(?=\s|\.\.)", argv)}
    assert used <= documented, f"undocumented ARGV in {script.name}.lua: {used - documented}"


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_header_documents_every_reply_status(script: Script) -> None:
    body = _strip_comments(_body(script))
    reply = _section(_header(_body(script)), "Reply")
    statuses = set(re.findall(r"return \{'(\w+)'", body))
    statuses |= set(re.findall(r"reply\('(\w+)'", body))
    if script.name in QUOTA_OPERATIONS:
        # These answer numbers: what passed, and how long to wait.
        assert not statuses, script.name
        assert re.search(r"Reply: .*\bthe ms\b", reply), script.name
        return
    assert statuses, script.name
    for status in statuses:
        assert f"'{status}'" in reply, f"{script.name}.lua: status {status!r} undocumented"


# -- key names come from KEYS only -------------------------------------------------------


def test_lib_helpers_take_key_names_as_parameters() -> None:
    helpers = _lib_key_params()
    assert set(helpers) == {"hgetall", "is_gone", "touch"}


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_redis_calls_name_only_keys_passed_in_keys(script: Script) -> None:
    body = _strip_comments(_body(script))
    names = _keys_locals(body)
    calls = list(_calls(body, "redis.call"))
    assert calls or "hgetall(" in body
    for _, args in calls:
        command = args[0].strip("'\"").upper()
        for arg in _key_args(command, args[1:]):
            assert _is_key_expr(arg, names), (
                f"{script.name}.lua: redis.call('{command}') key {arg!r} is not from KEYS"
            )


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_lib_helpers_are_given_keys_passed_in_keys(script: Script) -> None:
    body = _strip_comments(_body(script))
    names = _keys_locals(body) | {"KEYS"}
    for helper, positions in _lib_key_params().items():
        for _, args in _calls(body, helper):
            for position in positions:
                assert _is_key_expr(args[position], names), (
                    f"{script.name}.lua: {helper}() key argument {args[position]!r} "
                    "is not from KEYS"
                )


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_key_locals_are_never_reassigned(script: Script) -> None:
    body = _strip_comments(_body(script))
    for name in _keys_locals(body):
        assignments = re.findall(rf"\b{name}\s*=(?!=)", body)
        declared_last = re.search(rf"^local\s+[\w\s,]*\b{name}\s*=", body, re.M)
        assert len(assignments) <= (1 if declared_last else 0), f"{name} reassigned"
    assert not re.search(r"\bKEYS\s*\[[^\]]*\]\s*=(?!=)", body), "KEYS is modified"


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_no_key_is_built_by_concatenation(script: Script) -> None:
    source = _strip_comments(script.source)
    for _, args in _calls(source, "redis.call"):
        command = args[0].strip("'\"").upper()
        for arg in _key_args(command, args[1:]):
            assert ".." not in arg and "'" not in arg and '"' not in arg, arg


def test_heuristic_flags_a_built_key() -> None:
    body = "local meta_key = KEYS[1]\nredis.call('HGET', 'ds:' .. ARGV[1], 'x')\n"
    [(_, args)] = list(_calls(body, "redis.call"))
    assert not _is_key_expr(_key_args("HGET", args[1:])[0], _keys_locals(body))
    assert _is_key_expr("meta_key", _keys_locals(body))


# -- valid Lua, accepted by Redis -------------------------------------------------------


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize("script", _scripts(), ids=SCRIPT_IDS)
def test_script_load_accepts_script(sync_redis: redis.Redis, script: Script) -> None:
    assert sync_redis.script_load(script.source) == script.sha
    assert sync_redis.script_exists(script.sha) == [True]


def test_script_load_rejects_invalid_lua(sync_redis: redis.Redis) -> None:
    with pytest.raises(redis.ResponseError):
        sync_redis.script_load(LIB + "\nlocal x = (\n")


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("read", ["", "1024", "10", "", "read"], [b"not_found"]),
        (
            "append",
            ["1", "", "", "chan", "1", "1", "text/plain", "1", "", "", "", "", "", "x", ""],
            [[[b"not_found"]], [b""], 0],
        ),
        ("delete", ["chan"], [b"not_found"]),
        ("fork_acquire", ["", ""], [b"not_found"]),
        ("fork_release", [], [b"missing"]),
    ],
)
def test_script_runs_against_a_missing_stream(
    sync_redis: redis.Redis, name: str, args: list[str], expected: list[bytes]
) -> None:
    script: Script = getattr(SCRIPTS, name)
    keys = stream_keys("ds-unit-lua", f"missing/{name}").all
    sync_redis.delete(*keys)
    assert sync_redis.eval(script.source, len(keys), *keys, *args) == expected
    assert sync_redis.exists(*keys) == 0


def test_create_script_creates_then_confirms(sync_redis: redis.Redis) -> None:
    keys = stream_keys("ds-unit-lua", "create").all
    sync_redis.delete(*keys)
    args = ["text/plain", "text/plain", "", "", "", "", "", "", "0-0", "", "", "", ""]
    try:
        first = sync_redis.eval(SCRIPTS.create.source, len(keys), *keys, *args)
        again = sync_redis.eval(SCRIPTS.create.source, len(keys), *keys, *args)
    finally:
        sync_redis.delete(*keys)
    assert first == [b"created", b"0-0", b""]
    assert again == [b"exists", b"0-0", b"", b"text/plain"]
