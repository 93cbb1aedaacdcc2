"""gateway.cursor: CDN-collapsing cursors never go backwards (protocol section 10.1)."""

from __future__ import annotations

import pytest

from gateway.protocol import cursor
from gateway.protocol.cursor import CURSOR_EPOCH_S, current_interval, next_cursor

INTERVAL = 20
CURRENT = 86_400  # interval number used as "now" throughout
NOW = CURSOR_EPOCH_S + CURRENT * INTERVAL + 7.5  # somewhere inside that interval


def _is_ascii_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


# -- current_interval ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("now_s", "interval_s", "expected"),
    [
        (CURSOR_EPOCH_S, 20, 0),
        (CURSOR_EPOCH_S + 19.999, 20, 0),
        (CURSOR_EPOCH_S + 20, 20, 1),
        (CURSOR_EPOCH_S + 3600, 20, 180),
        (CURSOR_EPOCH_S + 3600, 1, 3600),
        (CURSOR_EPOCH_S + 3600, 3600, 1),
        (NOW, INTERVAL, CURRENT),
    ],
)
def test_current_interval_counts_from_the_cursor_epoch(
    now_s: float, interval_s: int, expected: int
) -> None:
    assert current_interval(interval_s, now_s) == expected


def test_current_interval_defaults_to_the_clock() -> None:
    assert current_interval(INTERVAL) >= current_interval(INTERVAL, 1_760_000_000)


# -- next_cursor: stale, absent or garbage cursors ----------------------------------


def test_absent_cursor_yields_current_interval() -> None:
    assert next_cursor(None, INTERVAL, NOW) == str(CURRENT)


@pytest.mark.parametrize("stale", ["0", "1", str(CURRENT - 1), str(CURRENT - 1000)])
def test_stale_cursor_yields_current_interval(stale: str) -> None:
    assert next_cursor(stale, INTERVAL, NOW) == str(CURRENT)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " ",
        "abc",
        "-1",
        f"-{CURRENT + 5}",
        "+99999999",
        "1.5",
        "1e9",
        "0x10",
        f" {CURRENT}",
        f"{CURRENT} ",
        f"{CURRENT}\n",
        f"{CURRENT}abc",
        "1" * 19,  # longer than 18 digits
        "9" * 100,
    ],
)
def test_garbage_cursor_yields_current_interval(garbage: str) -> None:
    assert next_cursor(garbage, INTERVAL, NOW) == str(CURRENT)


@pytest.mark.parametrize(
    "garbage",
    [
        "\u00b2",  # superscript two: str.isdigit() is True, int() raises ValueError
        "\u0661\u0662",  # Arabic-Indic "12": isdigit() and int() accept it
        "\u0669" * 10,  # Arabic-Indic "9999999999", far in the future
    ],
    ids=["superscript-2", "arabic-indic-12", "arabic-indic-9999999999"],
)
def test_non_ascii_digit_cursor_is_garbage(garbage: str) -> None:
    # The cursor arrives as a percent-decoded query parameter, so any of these
    # can be sent (e.g. ?cursor=%C2%B2).
    assert next_cursor(garbage, INTERVAL, NOW) == str(CURRENT)


# -- next_cursor: current or future cursors ------------------------------------------


@pytest.mark.parametrize(
    "echoed", [CURRENT, CURRENT + 1, CURRENT + 180, CURRENT + 10**6, 10**18 - 1]
)
def test_current_or_future_cursor_yields_a_strictly_greater_one(echoed: int) -> None:
    for _ in range(200):  # the jitter is random: the bound must hold every time
        result = next_cursor(str(echoed), INTERVAL, NOW)
        assert _is_ascii_decimal(result)
        assert echoed < int(result) <= echoed + 3600 // INTERVAL


@pytest.mark.parametrize(
    ("interval_s", "jitter_s", "expected_step"),
    [
        (20, 1, 1),  # jitter below one interval still moves forward by one
        (20, 3600, 180),
        (1, 1, 1),
        (1, 3600, 3600),
        (3600, 3600, 1),
        (7200, 3600, 1),  # intervals longer than the jitter range
        (7, 100, 14),
    ],
)
def test_jitter_is_whole_intervals_and_at_least_one(
    monkeypatch: pytest.MonkeyPatch, interval_s: int, jitter_s: int, expected_step: int
) -> None:
    calls: list[tuple[int, int]] = []

    def fixed_randint(low: int, high: int) -> int:
        calls.append((low, high))
        return jitter_s

    monkeypatch.setattr(cursor.random, "randint", fixed_randint)
    now_s = CURSOR_EPOCH_S + 1000 * interval_s
    assert next_cursor("1000", interval_s, now_s) == str(1000 + expected_step)
    assert calls == [(1, 3600)]


def test_repeated_echoes_never_go_backwards() -> None:
    value = next_cursor(None, INTERVAL, NOW)
    for _ in range(500):
        following = next_cursor(value, INTERVAL, NOW)
        assert int(following) > int(value)
        value = following


def test_cursor_is_never_behind_the_clock_once_time_passes() -> None:
    # A cursor handed out earlier, echoed after the clock moved past it.
    issued = next_cursor(None, INTERVAL, NOW)
    later = NOW + 10 * 3600
    assert next_cursor(issued, INTERVAL, later) == str(current_interval(INTERVAL, later))


@pytest.mark.parametrize("client", [None, "", "abc", "0", str(CURRENT), str(CURRENT + 5)])
def test_result_is_an_ascii_decimal_string(client: str | None) -> None:
    assert _is_ascii_decimal(next_cursor(client, INTERVAL, NOW))
