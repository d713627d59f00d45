"""A broken build must not pass by falling back to the pure-Python twin."""

from __future__ import annotations

import os

from edgeproxy import fastpath


def test_the_compiled_fast_path_runs_unless_switched_off() -> None:
    switched_off = os.environ.get("EDGEPROXY_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
    expected = "py" if switched_off else "c"
    assert expected == fastpath.IMPLEMENTATION, (
        "the compiled fast path did not load: rebuild with `pip install -e .`" if expected == "c" else ""
    )
