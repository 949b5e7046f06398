"""The token bucket behind the upstream limiter's rate and the per-user request rates.

Times are plain numbers handed in: nothing sleeps, and every figure is exact.
"""

from __future__ import annotations

import math

import pytest

from proxy.accounts.fairness import UserLimits
from proxy.shield.bucket import TokenBucket


def test_a_new_bucket_holds_one_seconds_worth_and_then_refuses() -> None:
    bucket = TokenBucket(4.0, now=100.0)
    assert bucket.burst == 4.0
    assert [bucket.admit(100.0) for _ in range(4)] == [0.0] * 4
    assert bucket.admit(100.0) == pytest.approx(0.25)  # one token at 4/s


def test_a_slow_rate_still_bursts_one_request() -> None:
    bucket = TokenBucket(0.5, now=0.0)
    assert bucket.burst == 1.0
    assert bucket.admit(0.0) == 0.0
    assert bucket.admit(0.0) == pytest.approx(2.0)  # a whole token at 0.5/s
    assert bucket.admit(1.5) == pytest.approx(0.5)
    assert bucket.admit(2.0) == 0.0


def test_refill_is_proportional_to_the_time_passed_and_capped_by_the_burst() -> None:
    bucket = TokenBucket(2.0, now=0.0)
    bucket.tokens = 0.0
    bucket.refill(0.25)
    assert bucket.tokens == pytest.approx(0.5)
    assert bucket.wait() == pytest.approx(0.25)
    bucket.refill(1000.0)
    assert bucket.tokens == 2.0  # a long idle spell earns no more than the burst
    assert bucket.refilled_at == 1000.0


def test_a_refusal_takes_nothing_and_tokens_never_go_negative() -> None:
    bucket = TokenBucket(1.0, now=0.0)
    assert bucket.take()
    for _ in range(5):
        assert not bucket.take()
        assert bucket.admit(0.0) == pytest.approx(1.0)
        assert bucket.tokens >= 0.0
    assert bucket.tokens == 0.0


def test_a_changed_rate_applies_from_the_next_refill() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    bucket.rate = 2.0
    bucket.refill(0.0)
    assert bucket.tokens == 2.0  # capped by the new burst
    bucket.cap(1.0)
    assert bucket.tokens == 1.0
    assert bucket.admit(0.0) == 0.0
    assert bucket.admit(0.0) == pytest.approx(0.5)


def test_without_a_rate_an_empty_bucket_never_fills() -> None:
    bucket = TokenBucket(0.0, now=0.0)
    assert bucket.take()
    assert bucket.wait() == math.inf


def test_user_limits_keep_a_bucket_per_user() -> None:
    now = [0.0]
    limits = UserLimits(1.0, 0, clock=lambda: now[0])
    assert limits.admit("ada") == 0.0
    assert limits.admit("ada") == pytest.approx(1.0)
    assert limits.admit("bob") == 0.0  # ada's use is not bob's
    assert limits.admit("ada", count=False) == pytest.approx(1.0)
    assert limits.refused == 1
    now[0] = 0.75
    assert limits.admit("ada") == pytest.approx(0.25)
    now[0] = 1.0
    assert limits.admit("ada") == 0.0
    assert UserLimits(0.0, 0).admit("ada") == 0.0  # no rate: no limit


def test_user_limits_forget_a_bucket_once_it_would_be_full_again() -> None:
    now = [0.0]
    limits = UserLimits(2.0, 0, clock=lambda: now[0])
    for _ in range(3):
        limits.admit("ada")
    assert limits.refused == 1
    assert "ada" in limits._buckets  # how much memory the users hold
    now[0] = 1.0  # burst (2) / rate (2/s): full again, the same as a new bucket
    assert "ada" not in limits._buckets
    assert [limits.admit("ada") for _ in range(3)][:2] == [0.0, 0.0]
    assert limits.refused == 2
