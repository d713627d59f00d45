"""Per-client limits shared through Redis (edgeproxy.sharedlimits.SharedLimiter): two limiters on one
event loop play two workers (of one node or two) against a real redis-server on loopback, which the
outage tests kill, restart and pause (SIGSTOP). ``loop_kind`` (conftest) runs some on uvloop too."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import redis
import structlog
import uvloop
from structlog.testing import capture_logs

from edgeproxy import sharedlimits
from edgeproxy.limits import ConnectionLimiter
from edgeproxy.sharedlimits import RATE_LIMITED, TOO_MANY_CONNECTIONS, SharedLimiter
from tests.redis_server import RedisServer

CLIENT = "192.0.2.1"
OTHER = "2001:db8::1"
# Generous where Redis is healthy, so a slow CI machine never fakes an outage.
HEALTHY_TIMEOUT = 2.0
# The outage tests' timeout, and what a decision may take beyond it (scheduling on a busy machine).
TIMEOUT = 0.1
SLACK = 0.2
RETRY = 0.3
# uvloop's timers run on a clock cached per loop iteration, so a sleep can end a little before
# time.monotonic() says it should: wait a margin longer before counting on the retry.
AFTER_RETRY = RETRY + 0.05
# A decision that waited for Redis took about TIMEOUT; one that did not, far less.
WAITED = TIMEOUT / 2

_ids = itertools.count()


def conn_key(client: str) -> str:
    return f"edgeproxy:conn:{{{client}}}"


def rate_key(client: str) -> str:
    return f"edgeproxy:rate:{{{client}}}"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture
def inspect(server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client to look into Redis (never used while Redis is paused: it would wait)."""
    client = redis.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The limiter's log lines. The suite logs at warning (conftest) and structlog fixes a logger's
    level on its first use, so the module gets a fresh logger made under an info-level set-up."""
    wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    monkeypatch.setattr(sharedlimits, "log", structlog.get_logger("edgeproxy"))
    try:
        with capture_logs() as entries:
            yield entries
    finally:
        structlog.configure(wrapper_class=wrapper)


def events(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [entry for entry in entries if entry["event"] == name]


def run(test: Callable[[], Coroutine[Any, Any, None]], loop_kind: str = "asyncio") -> None:
    factory = uvloop.new_event_loop if loop_kind == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(test(), 20))


def limiter(server: RedisServer, holder: str, *, max_total: int = 100, per_ip: int = 2, rate: int = 0,
            hold: float = 60.0, timeout: float = HEALTHY_TIMEOUT) -> SharedLimiter:
    return SharedLimiter(ConnectionLimiter(max_total, per_ip, rate), server.url, timeout, holder=holder,
                         hold_seconds=hold, retry_interval=RETRY)


def new_id() -> str:
    return f"c{next(_ids)}"


async def admit(worker: SharedLimiter, client: str = CLIENT) -> tuple[str | None, str]:
    connection_id = new_id()
    return await worker.admit(client, connection_id, time.monotonic()), connection_id


async def timed_admit(worker: SharedLimiter, client: str = CLIENT) -> tuple[str | None, str, float]:
    started = time.monotonic()
    verdict, connection_id = await admit(worker, client)
    return verdict, connection_id, time.monotonic() - started


def calls(inspect: redis.Redis, command: str) -> int:
    stats: dict[str, dict[str, int]] = inspect.info("commandstats")  # type: ignore[assignment]
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


# -- shared decisions ------------------------------------------------------------------------------


def test_two_workers_share_the_per_client_limit_and_a_release_frees_the_slot_for_both(
        server: RedisServer, inspect: redis.Redis, loop_kind: str) -> None:
    async def test() -> None:
        a, b = limiter(server, "node1/1"), limiter(server, "node2/1")
        (first, first_id), (second, second_id) = await admit(a), await admit(b)
        assert first is None and second is None
        assert (await admit(a))[0] == TOO_MANY_CONNECTIONS
        assert (await admit(b))[0] == TOO_MANY_CONNECTIONS
        assert (await admit(a, OTHER))[0] is None  # another client is not affected
        assert inspect.zrange(conn_key(CLIENT), 0, -1) == [f"node1/1/{first_id}", f"node2/1/{second_id}"]
        b.release(CLIENT, second_id)
        await b.settle()
        assert (await admit(a))[0] is None
        assert (await admit(b))[0] == TOO_MANY_CONNECTIONS
        # Each worker counts what it holds: the local limits stay true for a fallback.
        assert (a.local.total, b.local.total) == (3, 0)
        assert a.healthy and b.healthy and a.fallbacks == b.fallbacks == 0
        await a.close()
        await b.close()

    run(test, loop_kind)


def test_two_workers_share_the_rate_and_refusals_are_not_counted(server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        a, b = limiter(server, "a", per_ip=0, rate=3), limiter(server, "b", per_ip=0, rate=3)
        admitted = [await admit(a), await admit(b), await admit(a)]
        assert [verdict for verdict, _ in admitted] == [None, None, None]
        for _ in range(5):
            assert (await admit(b))[0] == RATE_LIMITED
            assert (await admit(a))[0] == RATE_LIMITED
        for worker, (_, connection_id) in zip((a, b, a), admitted, strict=True):
            worker.release(CLIENT, connection_id)
        assert (await admit(b))[0] == RATE_LIMITED  # the rate counts admissions, not connections held
        assert inspect.zcard(rate_key(CLIENT)) == 3
        assert not inspect.exists(conn_key(CLIENT))  # no per-client limit: nothing held in Redis
        assert 0 < inspect.pttl(rate_key(CLIENT)) <= 60_000
        await a.close()
        await b.close()

    run(test)


def test_refused_admissions_count_neither_as_connections_nor_in_the_rate(
        server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        a, b = limiter(server, "a", per_ip=1, rate=2), limiter(server, "b", per_ip=1, rate=2)
        verdict, first_id = await admit(a)
        assert verdict is None
        for _ in range(5):
            assert (await admit(b))[0] == TOO_MANY_CONNECTIONS
        assert inspect.zcard(rate_key(CLIENT)) == 1
        assert b.local.total == 0
        a.release(CLIENT, first_id)
        await a.settle()
        verdict, second_id = await admit(b)
        assert verdict is None  # had the refusals counted, this would be rate limited
        b.release(CLIENT, second_id)
        await b.settle()
        assert (await admit(a))[0] == RATE_LIMITED
        assert inspect.zcard(rate_key(CLIENT)) == 2
        assert inspect.zcard(conn_key(CLIENT)) == 0
        await a.close()
        await b.close()

    run(test)


def test_concurrent_admissions_never_exceed_the_shared_limit(server: RedisServer) -> None:
    async def test() -> None:
        a, b = limiter(server, "a", per_ip=5), limiter(server, "b", per_ip=5)
        verdicts = await asyncio.gather(*(admit(worker) for worker in (a, b) * 20))
        assert sum(verdict is None for verdict, _ in verdicts) == 5
        assert a.local.total + b.local.total == 5
        await a.close()
        await b.close()

    run(test)


def test_the_total_is_the_workers_own_capacity_and_never_asks_redis(
        server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        a, b = limiter(server, "a", max_total=1, per_ip=5), limiter(server, "b", max_total=1, per_ip=5)
        assert (await admit(a))[0] is None
        inspect.config_resetstat()
        assert (await admit(a, OTHER))[0] == TOO_MANY_CONNECTIONS
        assert calls(inspect, "evalsha") == 0
        assert (await admit(b, OTHER))[0] is None  # the other worker has its own capacity
        await a.close()
        await b.close()

    run(test)


def test_without_per_client_limits_redis_is_never_asked() -> None:
    async def test() -> None:
        # Nothing listens on port 9 of loopback: any call would fail.
        worker = SharedLimiter(ConnectionLimiter(2, 0, 0), "redis://127.0.0.1:9/0", TIMEOUT, holder="a",
                               hold_seconds=60)
        assert [(await admit(worker))[0] for _ in range(3)] == [None, None, TOO_MANY_CONNECTIONS]
        assert worker.healthy and worker.fallbacks == 0
        await worker.close()

    run(test)


def test_release_is_counted_once_and_removes_the_connection_from_redis_once(
        server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        a = limiter(server, "a")
        _, connection_id = await admit(a)
        inspect.config_resetstat()
        a.release(CLIENT, connection_id)
        a.release(CLIENT, connection_id)
        a.release(CLIENT, "never-admitted")
        assert a.local.total == 0
        await a.settle()
        assert calls(inspect, "zrem") == 1
        assert inspect.zcard(conn_key(CLIENT)) == 0
        await a.close()

    run(test)


def test_a_crashed_workers_connections_expire_after_hold_seconds(server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        crashed = limiter(server, "crashed", per_ip=2, hold=0.3)
        survivor = limiter(server, "survivor", per_ip=2)
        assert [(await admit(crashed))[0] for _ in range(2)] == [None, None]
        await crashed.close()  # never releasing: as if the worker had died
        assert (await admit(survivor))[0] == TOO_MANY_CONNECTIONS
        assert 0 < inspect.pttl(conn_key(CLIENT)) <= 300
        await asyncio.sleep(0.35)
        assert not inspect.exists(conn_key(CLIENT))  # an idle client leaves nothing behind
        assert (await admit(survivor))[0] is None
        await survivor.close()

    run(test)


# -- Redis unwell ----------------------------------------------------------------------------------


def test_killed_redis_falls_back_at_once_to_the_local_limits(
        server: RedisServer, logs: list[dict[str, Any]], loop_kind: str) -> None:
    async def test() -> None:
        a = limiter(server, "a", per_ip=1, timeout=TIMEOUT)
        b = limiter(server, "b", per_ip=1, rate=3, timeout=TIMEOUT)
        held_by_a = await admit(a)
        assert held_by_a[0] is None
        assert (await admit(b))[0] == TOO_MANY_CONNECTIONS  # shared while Redis is up
        server.stop()
        # B now decides what a worker without Redis would: compare with a twin that never had it.
        twin = ConnectionLimiter(100, 1, 3)
        now = time.monotonic()
        for client in (CLIENT, CLIENT, OTHER, OTHER, "192.0.2.7", CLIENT):
            started = time.monotonic()
            verdict = await b.admit(client, new_id(), now)
            assert time.monotonic() - started < TIMEOUT + SLACK
            assert verdict == twin.admit(client, now)
        assert b.local.total == twin.total == 3
        assert not b.healthy and b.outages == 1 and b.fallbacks == 6
        a.release(CLIENT, held_by_a[1])  # waits for Redis's return, without an error
        down = events(logs, "redis_down")
        assert len(down) == 1 and down[0]["log_level"] == "warning" and down[0]["reason"]
        assert not events(logs, "redis_up")
        await a.close()
        await b.close()

    run(test, loop_kind)


def test_restarted_redis_brings_shared_decisions_back_after_the_retry_interval(
        server: RedisServer, logs: list[dict[str, Any]]) -> None:
    async def test() -> None:
        a, b = limiter(server, "a", per_ip=1, timeout=TIMEOUT), limiter(server, "b", per_ip=1, timeout=TIMEOUT)
        assert (await admit(a))[0] is None
        server.stop()
        assert (await admit(b))[0] is None  # fallback: B holds nothing of this client
        server.start()
        assert (await admit(b, OTHER))[0] is None  # still local: the retry interval has not passed
        assert b.fallbacks == 2 and not b.healthy
        await asyncio.sleep(AFTER_RETRY)
        assert (await admit(b, "192.0.2.7"))[0] is None  # the trial, through Redis (its script reloaded)
        assert b.healthy and b.fallbacks == 2 and b.outages == 1
        up = events(logs, "redis_up")
        assert len(up) == 1 and up[0]["local_decisions"] == 2
        # Shared again: what B admits, A cannot. A made no decision during the outage, and its pooled
        # connection, dead since the restart, is replaced within the call: no outage for A.
        assert (await admit(a, "192.0.2.7"))[0] == TOO_MANY_CONNECTIONS
        assert a.healthy and a.outages == 0
        assert len(events(logs, "redis_down")) == 1
        await a.close()
        await b.close()

    run(test)


def test_paused_redis_bounds_every_decision_by_the_timeout(
        server: RedisServer, inspect: redis.Redis, logs: list[dict[str, Any]], loop_kind: str) -> None:
    async def test() -> None:
        worker = limiter(server, "a", per_ip=3, timeout=TIMEOUT)
        verdict, held_id = await admit(worker)
        assert verdict is None
        server.pause()
        first = await timed_admit(worker)
        assert first[0] is None and WAITED <= first[2] < TIMEOUT + SLACK
        # Meanwhile no decision waits, and the local per-client limit (3) holds.
        rest = [await timed_admit(worker) for _ in range(3)]
        assert [verdict for verdict, _, _ in rest] == [None, TOO_MANY_CONNECTIONS, TOO_MANY_CONNECTIONS]
        assert all(elapsed < WAITED for _, _, elapsed in rest)
        worker.release(CLIENT, rest[0][1])
        await asyncio.sleep(AFTER_RETRY)
        # One trial at a time: of concurrent decisions, one waits for Redis, the others do not.
        trials = await asyncio.gather(*(timed_admit(worker, OTHER) for _ in range(4)))
        assert sorted(elapsed >= WAITED for _, _, elapsed in trials) == [False, False, False, True]
        assert all(elapsed < TIMEOUT + SLACK for _, _, elapsed in trials)
        assert worker.outages == 1 and worker.fallbacks == 8 and len(events(logs, "redis_down")) == 1
        server.resume()
        await asyncio.sleep(AFTER_RETRY)
        assert (await admit(worker, "192.0.2.7"))[0] is None
        assert worker.healthy and events(logs, "redis_up")[0]["local_decisions"] == 8
        await worker.settle()
        # The timed-out calls ran once Redis woke up; their entries are gone again, and only the
        # connection admitted through Redis (and still held) counts.
        assert inspect.zrange(conn_key(CLIENT), 0, -1) == [f"a/{held_id}"]
        assert inspect.zcard(conn_key(OTHER)) == 0
        await worker.close()

    run(test, loop_kind)


def test_release_after_a_fallback_admission_does_not_touch_redis(
        server: RedisServer, inspect: redis.Redis) -> None:
    async def test() -> None:
        worker = limiter(server, "a", per_ip=3, timeout=TIMEOUT)
        assert (await admit(worker))[0] is None  # connected while healthy
        server.stop()
        verdict, local_id = await admit(worker)
        assert verdict is None and not worker.healthy
        server.start()
        await asyncio.sleep(AFTER_RETRY)
        verdict, shared_id = await admit(worker)
        assert verdict is None and worker.healthy
        await worker.settle()
        inspect.config_resetstat()
        worker.release(CLIENT, local_id)
        await worker.settle()
        assert calls(inspect, "zrem") == 0
        worker.release(CLIENT, shared_id)
        await worker.settle()
        assert calls(inspect, "zrem") == 1
        assert worker.local.total == 1  # the connection admitted before the outage
        await worker.close()

    run(test)


def test_every_outage_is_counted_and_logged_once(server: RedisServer, logs: list[dict[str, Any]]) -> None:
    async def test() -> None:
        worker = limiter(server, "a", per_ip=0, rate=100, timeout=TIMEOUT)
        for outage in range(2):
            server.stop()
            for _ in range(3):
                assert (await admit(worker))[0] is None
            server.start()
            await asyncio.sleep(AFTER_RETRY)
            assert (await admit(worker))[0] is None
            assert worker.healthy and worker.outages == outage + 1
        assert worker.fallbacks == 6
        assert len(events(logs, "redis_down")) == 2
        assert [line["local_decisions"] for line in events(logs, "redis_up")] == [3, 3]
        await worker.close()

    run(test)
