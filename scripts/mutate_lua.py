"""Hand-picked mutations of the Lua scripts, each applied alone to a copy of the
scripts, followed by the tests that should notice it (run by scripts/mutate).

    python scripts/mutate_lua.py LUA_DIR      # from the root of a throw-away copy

Each mutation is a small, plausible bug at a boundary the protocol cares about:
a comparison off by one, a refusal dropped, a key not cleaned up. A mutation
"survives" when its tests still pass; the table says which.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

STORE_TESTS = ("tests/unit/test_lua_scripts.py", "tests/integration/test_store.py")
FORK_TESTS = (*STORE_TESTS, "tests/integration/test_forks.py")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Mutation:
    file: str
    old: str
    new: str
    why: str  # the bug it stands for
    tests: tuple[str, ...] = STORE_TESTS


MUTATIONS = (
    Mutation("append.lua", "elseif seq <= state_seq then", "elseif seq < state_seq then",
             "a producer's repeated seq is appended again instead of acknowledged as dup"),
    Mutation("append.lua", "elseif seq ~= state_seq + 1 then", "elseif seq > state_seq + 2 then",
             "a producer's sequence gap of one is accepted"),
    Mutation("append.lua", "    elseif epoch < state_epoch then",
             "    elseif epoch <= state_epoch and seq == 0 then",
             "a stale epoch is not refused"),
    Mutation("append.lua", "if seq ~= 0 then return {'seq_gap', tail, '', '0', seq_s} end",
             "",
             "a new producer may start at any seq"),
    Mutation("append.lua", "byte_cmp(stream_seq, m.seq) <= 0", "byte_cmp(stream_seq, m.seq) < 0",
             "a repeated Stream-Seq is accepted"),
    Mutation("append.lua", "if has_body and m.mt ~= media_type then return",
             "if false then return",
             "an append with another content type is accepted"),
    Mutation("append.lua", "#st.data <= 16384", "#st.data < 16384",
             "a 16 KiB append is no longer carried in its wake-up message",
             (*STORE_TESTS,
              "tests/e2e/test_live.py::test_a_long_poll_on_a_listened_stream_reads_once")),
    Mutation("append.lua", "if size > tonumber(m.mx) then", "if size < tonumber(m.mx) then",
             "the largest entry's size (read planning) is not kept"),
    Mutation("append.lua", "  trimmed_entries = trimmed_entries\n", "  trimmed_entries = 0\n",
             "a run's retention trims are not summed (the trimmed-entries counter under-counts)",
             (*STORE_TESTS, "tests/integration/test_retention.py")),
    Mutation("_lib.lua", "if now > ms then return", "if now >= ms then return",
             "two appends in one millisecond get the same entry id"),
    Mutation("_lib.lua", "if m.exp and now >= tonumber(m.exp)",
             "if m.exp and now > tonumber(m.exp)",
             "a stream is still served at its exact expiry time"),
    Mutation("_lib.lua", "  if m.del == '1' then return true end\n", "",
             "a soft-deleted stream is served again", FORK_TESTS),
    Mutation("read.lua", "  if count >= max_entries then", "  if count > max_entries then",
             "a page holds one entry more than the entry limit"),
    Mutation("read.lua", "size + #data > max_bytes or", "size + #data >= max_bytes or",
             "a page exactly the byte budget in size is cut one entry early"),
    Mutation("read.lua", "if id_cmp(after, m.tail) >= 0 then return reply(",
             "if id_cmp(after, m.tail) > 0 then return reply(",
             "a read at the tail is planned as an XRANGE"),
    Mutation("read.lua", "if wanted >= 8 and wanted >= math.floor(natural / 4) then",
             "if wanted >= 1 then",
             "tiny planned pages where a few entries are far larger than the rest"),
    Mutation("create.lua", "redis.call('DEL', data_key, KEYS[3], KEYS[4])",
             "redis.call('DEL', data_key)",
             "a re-created stream keeps its previous incarnation's producer state"),
    Mutation("delete.lua", "if refs_of(m) > 0 then", "if refs_of(m) > 1 then",
             "a source with one fork is deleted outright instead of soft-deleted",
             FORK_TESTS),
    Mutation("fork_release.lua", "if refs > 0 then return {'held'} end",
             "if refs > 1 then return {'held'} end",
             "a source still read by one fork is removed", FORK_TESTS),
    Mutation("fork_acquire.lua", "redis.call('HINCRBY', meta_key, 'refs', 1) == 1",
             "redis.call('HINCRBY', meta_key, 'refs', 0) == 1",
             "a fork does not count as a reference on its source", FORK_TESTS),
)


def run(lua_dir: Path) -> int:
    rows = []
    for number, mutation in enumerate(MUTATIONS, 1):
        path = lua_dir / mutation.file
        original = path.read_text()
        if original.count(mutation.old) != 1:
            rows.append((number, mutation, "NOT APPLIED (text not found once)", 0.0))
            continue
        path.write_text(original.replace(mutation.old, mutation.new))
        started = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                 *mutation.tests],
                capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
            )
            verdict = "survived" if result.returncode == 0 else "killed"
        except subprocess.TimeoutExpired:
            verdict = "killed (timeout)"
        finally:
            path.write_text(original)
        elapsed = time.monotonic() - started
        rows.append((number, mutation, verdict, elapsed))
        print(f"  {number:2d} {verdict:9s} {elapsed:5.1f}s {mutation.file}: {mutation.why}",
              flush=True)
    killed = sum(1 for _, _, verdict, _ in rows if verdict.startswith("killed"))
    print(f"\nLua: {killed}/{len(rows)} killed")
    for number, mutation, verdict, _ in rows:
        if not verdict.startswith("killed"):
            print(f"  {verdict}: #{number} {mutation.file}: {mutation.old!r} -> {mutation.new!r}"
                  f" ({mutation.why})")
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
