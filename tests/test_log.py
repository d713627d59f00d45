"""The JSON line writer: a worker's lines held briefly and written together in whole lines, within
PIPE_BUF, so workers sharing stderr never cut into each other's lines; nothing held is lost."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import structlog

from edgeproxy import log as logsetup


class RecordingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return len(data)


class Stderr:
    def __init__(self) -> None:
        self.buffer = RecordingStream()

    def isatty(self) -> bool:
        return False


@pytest.fixture
def stderr():
    # Put back the very configuration (the same processor list) the suite's loggers were cached
    # with: capture_logs in other tests edits that list in place.
    saved = structlog.get_config()
    saved_lines, saved_info = logsetup._json_lines, logsetup.info_enabled
    stream = Stderr()
    logsetup.configure("info", "json", stream)  # type: ignore[arg-type]
    yield stream.buffer
    logsetup.batch_writes(None)
    structlog.configure(**saved)
    logsetup._json_lines, logsetup.info_enabled = saved_lines, saved_info


def lines(writes: list[bytes]) -> list[dict]:
    return [json.loads(line) for write in writes for line in write.splitlines()]


def test_lines_are_held_briefly_and_leave_in_one_write(stderr) -> None:
    hold = logsetup.JsonLines.HOLD_SECONDS

    async def main() -> None:
        logsetup.batch_writes(asyncio.get_running_loop())
        for number in range(3):
            logsetup.info_line("session", {"number": number})
        structlog.get_logger("edgeproxy").warning("through_structlog", number=3)
        await asyncio.sleep(0)
        assert stderr.writes == []  # held
        await asyncio.sleep(hold * 2)
        assert len(stderr.writes) == 1
        logsetup.info_line("session", {"number": 4})
        await asyncio.sleep(hold * 2)
        assert len(stderr.writes) == 2

    asyncio.run(main())
    written = lines(stderr.writes)
    assert [line["number"] for line in written] == [0, 1, 2, 3, 4]
    assert [line["level"] for line in written] == ["info"] * 3 + ["warning", "info"]
    assert all(line["timestamp"].endswith("Z") for line in written)


def test_many_lines_are_written_in_whole_lines_within_pipe_buf(stderr) -> None:
    async def main() -> None:
        logsetup.batch_writes(asyncio.get_running_loop())
        for number in range(100):
            logsetup.info_line("session", {"number": number, "padding": "x" * 200})
        await asyncio.sleep(logsetup.JsonLines.HOLD_SECONDS * 2)

    asyncio.run(main())
    assert len(stderr.writes) > 1
    assert all(len(write) <= logsetup.JsonLines.MAX_WRITE and write.endswith(b"\n") for write in stderr.writes)
    assert [line["number"] for line in lines(stderr.writes)] == list(range(100))


def test_detaching_the_loop_writes_what_is_held_and_then_writes_at_once(stderr) -> None:
    loop = asyncio.new_event_loop()
    try:
        logsetup.batch_writes(loop)
        logsetup.info_line("session", {"number": 0})
        assert stderr.writes == []
        logsetup.batch_writes(None)  # as a worker does when its loop ends, run or crash
        assert len(stderr.writes) == 1
        logsetup.info_line("session", {"number": 1})
        assert len(stderr.writes) == 2
    finally:
        loop.close()
    assert [line["number"] for line in lines(stderr.writes)] == [0, 1]


def test_the_transaction_line_is_written_at_debug_only(logged_proxy, sink) -> None:
    from tests.conftest import wait_for

    for level, expected in (("debug", 1), ("info", 0)):
        proxy = logged_proxy(sink.address, log_level=level)
        with proxy.client() as client:
            assert client.sendmail("a@b.test", ["user@example.test"], "Subject: x\r\n\r\nhello\r\n") == {}
        assert wait_for(lambda proxy=proxy: proxy.count("session") == 1, 10)
        transactions = [line for line in proxy.lines if line.get("event") == "transaction"]
        assert len(transactions) == expected, proxy.lines
        if expected:
            assert transactions[0]["delivered"] is True and transactions[0]["recipients"] == 1
