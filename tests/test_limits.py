"""Per-worker connection limits (edgeproxy.limits.ConnectionLimiter): total, per client address and
per-minute rate, with time passed in, so no test sleeps."""

from __future__ import annotations

import pytest

from edgeproxy.limits import _RATE_WINDOW, ConnectionLimiter
from edgeproxy.refusals import POLICY_DEFAULTS

TOO_MANY = "TOO_MANY_CONNECTIONS"
RATE_LIMITED = "RATE_LIMITED"
NO_LIMIT = 10**9


def test_every_limit_named_has_a_configurable_reply() -> None:
    # The server looks the name up in the policy's reply table (built from POLICY_DEFAULTS).
    limiter = ConnectionLimiter(max_total=1, max_per_ip=1, rate_per_minute=1)
    limiter.admit("192.0.2.1", now=0.0)
    names = {limiter.admit("192.0.2.1", now=0.0), limiter.admit("192.0.2.2", now=0.0)}
    limiter.release("192.0.2.1")
    names.add(limiter.admit("192.0.2.1", now=1.0))
    assert names == {TOO_MANY, RATE_LIMITED}
    assert names <= set(POLICY_DEFAULTS)


def test_connections_are_admitted_up_to_the_total_limit() -> None:
    limiter = ConnectionLimiter(max_total=3, max_per_ip=0, rate_per_minute=0)
    for number in range(3):
        assert limiter.admit(f"192.0.2.{number}", now=0.0) is None
    assert limiter.total == 3
    assert limiter.admit("192.0.2.99", now=0.0) == TOO_MANY
    assert limiter.total == 3


def test_a_released_connection_makes_room_under_the_total_limit() -> None:
    limiter = ConnectionLimiter(max_total=1, max_per_ip=0, rate_per_minute=0)
    assert limiter.admit("192.0.2.1", now=0.0) is None
    assert limiter.admit("192.0.2.2", now=0.0) == TOO_MANY
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.2", now=0.0) is None


def test_connections_are_admitted_up_to_the_per_client_limit() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=2, rate_per_minute=0)
    assert limiter.admit("192.0.2.1", now=0.0) is None
    assert limiter.admit("192.0.2.1", now=0.0) is None
    assert limiter.admit("192.0.2.1", now=0.0) == TOO_MANY
    assert limiter.admit("192.0.2.2", now=0.0) is None  # another client is not affected
    limiter.release("192.0.2.1")
    assert limiter.admit("192.0.2.1", now=0.0) is None


def test_per_client_limit_zero_means_none() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=0)
    for _ in range(500):
        assert limiter.admit("192.0.2.1", now=0.0) is None
    assert limiter.total == 500


def test_the_total_limit_applies_before_the_per_client_one() -> None:
    limiter = ConnectionLimiter(max_total=2, max_per_ip=5, rate_per_minute=0)
    limiter.admit("192.0.2.1", now=0.0)
    limiter.admit("192.0.2.1", now=0.0)
    assert limiter.admit("192.0.2.1", now=0.0) == TOO_MANY


def admit_and_release(limiter: ConnectionLimiter, client: str, now: float) -> str | None:
    """A connection that comes and goes at once: only the rate can refuse it."""
    refusal = limiter.admit(client, now)
    if refusal is None:
        limiter.release(client)
    return refusal


def test_rate_limit_within_the_window() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=3)
    for now in (0.0, 1.0, 2.0):
        assert admit_and_release(limiter, "192.0.2.1", now) is None
    assert admit_and_release(limiter, "192.0.2.1", now=30.0) == RATE_LIMITED
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW - 0.001) == RATE_LIMITED
    assert admit_and_release(limiter, "192.0.2.2", now=30.0) is None  # the rate is per client


def test_rate_limit_lifts_as_old_connections_leave_the_window() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=3)
    for now in (0.0, 10.0, 20.0):
        assert admit_and_release(limiter, "192.0.2.1", now) is None
    # A connection exactly one window old no longer counts.
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW) is None
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW + 5) == RATE_LIMITED
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW + 10) is None
    assert admit_and_release(limiter, "192.0.2.1", now=10 * _RATE_WINDOW) is None


def test_rate_limit_zero_means_none() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=0)
    for number in range(1000):
        assert admit_and_release(limiter, "192.0.2.1", now=number / 1000) is None
    assert limiter._recent == {}  # nothing remembered when there is no rate to keep


def test_a_connection_refused_for_its_rate_is_not_counted() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=2)
    assert admit_and_release(limiter, "192.0.2.1", now=0.0) is None
    assert admit_and_release(limiter, "192.0.2.1", now=30.0) is None
    for now in (31.0, 40.0, 59.0):
        assert admit_and_release(limiter, "192.0.2.1", now) == RATE_LIMITED
    assert limiter.total == 0
    # Only the connection at 30 is in the window now; had the refusals counted, four would be.
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW + 1) is None
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW + 2) == RATE_LIMITED


def test_a_connection_refused_for_the_connection_limits_is_not_counted() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=1, rate_per_minute=2)
    assert limiter.admit("192.0.2.1", now=0.0) is None
    for now in (1.0, 2.0, 3.0):
        assert limiter.admit("192.0.2.1", now) == TOO_MANY
    assert limiter.total == 1
    limiter.release("192.0.2.1")
    # One connection in the window, not four: a second one is still within the rate.
    assert limiter.admit("192.0.2.1", now=4.0) is None
    assert limiter.total == 1


@pytest.mark.parametrize("max_per_ip", [0, 3])
def test_release_returns_every_count_to_zero(max_per_ip: int) -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=max_per_ip, rate_per_minute=10)
    clients = ["192.0.2.1", "192.0.2.1", "192.0.2.2", "2001:db8::1", "192.0.2.1"]
    for client in clients:
        assert limiter.admit(client, now=0.0) is None
    assert limiter.total == len(clients)
    assert limiter._per_ip == {"192.0.2.1": 3, "192.0.2.2": 1, "2001:db8::1": 1}
    for client in clients:
        limiter.release(client)
    assert limiter.total == 0
    assert limiter._per_ip == {}


def test_a_released_client_is_forgotten_while_others_are_kept() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=2, rate_per_minute=0)
    limiter.admit("192.0.2.1", now=0.0)
    limiter.admit("192.0.2.1", now=0.0)
    limiter.admit("192.0.2.2", now=0.0)
    limiter.release("192.0.2.1")
    assert limiter._per_ip == {"192.0.2.1": 1, "192.0.2.2": 1}
    limiter.release("192.0.2.1")
    assert "192.0.2.1" not in limiter._per_ip
    assert limiter._per_ip == {"192.0.2.2": 1}


def test_clients_not_seen_for_a_window_are_forgotten() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=5)
    for number in range(1000):
        assert admit_and_release(limiter, f"10.0.{number // 256}.{number % 256}", now=number * 0.05) is None
    assert len(limiter._recent) == 1000  # all within one window: all remembered
    assert admit_and_release(limiter, "192.0.2.1", now=3 * _RATE_WINDOW) is None
    assert set(limiter._recent) == {"192.0.2.1"}


def test_the_rate_table_stays_bounded_under_a_stream_of_new_clients() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=5)
    per_second = 10
    largest = 0
    for second in range(int(10 * _RATE_WINDOW)):
        for number in range(per_second):
            admit_and_release(limiter, f"client-{second}-{number}", now=second + number / per_second)
        largest = max(largest, len(limiter._recent))
    # The prune runs once a window and forgets what is a window old: at most two windows' worth.
    assert largest <= 2 * _RATE_WINDOW * per_second + per_second
    assert limiter.total == 0


def test_a_client_seen_within_the_window_keeps_its_rate_across_a_prune() -> None:
    limiter = ConnectionLimiter(max_total=NO_LIMIT, max_per_ip=0, rate_per_minute=2)
    assert admit_and_release(limiter, "192.0.2.9", now=0.0) is None  # the first prune; the next is due at 60
    assert admit_and_release(limiter, "192.0.2.1", now=40.0) is None
    assert admit_and_release(limiter, "192.0.2.1", now=50.0) is None
    assert admit_and_release(limiter, "192.0.2.2", now=_RATE_WINDOW + 10) is None  # prunes
    assert set(limiter._recent) == {"192.0.2.1", "192.0.2.2"}
    assert admit_and_release(limiter, "192.0.2.1", now=_RATE_WINDOW + 10) == RATE_LIMITED
