"""The backoff policy on its own: doubling, the cap, jitter bounds, Retry-After."""

from __future__ import annotations

import random

import pytest

from delivery._backoff import BackoffPolicy
from delivery.matrix import parse_retry_after


def test_waits_double_from_the_initial_delay_up_to_the_maximum() -> None:
    policy = BackoffPolicy(initial_delay=1, max_delay=300)
    assert [policy.base(n) for n in range(1, 12)] == [
        1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300,
    ]  # fmt: skip
    assert policy.base(10_000) == 300


def test_jitter_stays_within_twenty_percent_and_spreads() -> None:
    policy = BackoffPolicy(initial_delay=1, max_delay=300, jitter=0.2)
    rng = random.Random(1)
    for failures in (1, 5):
        waits = [policy.delay(failures, rng) for _ in range(2000)]
        base = policy.base(failures)
        assert min(waits) >= base * 0.8
        assert max(waits) <= base * 1.2
        assert max(waits) - min(waits) > base * 0.3  # really jittered


def test_max_delay_is_the_longest_wait_jitter_included() -> None:
    policy = BackoffPolicy(initial_delay=1, max_delay=300, jitter=0.2)
    rng = random.Random(1)
    for failures in (9, 10, 20):  # bases 256, 300, 300: jitter would reach 307 and 360
        waits = [policy.delay(failures, rng) for _ in range(2000)]
        base = policy.base(failures)
        assert min(waits) >= base * 0.8
        assert max(waits) <= 300
        assert max(waits) - min(waits) > 40  # still jittered below the cap
    waits = [policy.delay(10, rng, retry_after=299) for _ in range(200)]
    assert min(waits) >= 299
    assert max(waits) <= 300


def test_retry_after_is_honoured_when_longer_and_capped_by_the_maximum() -> None:
    policy = BackoffPolicy(initial_delay=1, max_delay=300, jitter=0)
    rng = random.Random(0)
    assert policy.delay(1, rng, retry_after=30) == 30
    assert policy.delay(1, rng, retry_after=0.5) == 1
    assert policy.delay(1, rng, retry_after=10_000) == 300


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 60.0),  # 100 s after the epoch, now is 40 s
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),  # in the past: at once
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_takes_seconds_or_an_http_date(
    header: str | None, expected: float | None
) -> None:
    assert parse_retry_after(header, now=40.0) == expected
