"""A broken build must not pass by falling back to the pure-Python twin."""

from __future__ import annotations

import os

from edgeproxy import fastpath


def test_the_compiled_fast_path_runs_unless_switched_off() -> None:
    # What edgeproxy.fastpath counts as "off": anything but unset, "", "0", "false" or "no".
    switched_off = os.environ.get("EDGEPROXY_NO_EXTENSIONS", "").strip().lower() not in ("", "0", "false", "no")
    if switched_off:
        assert fastpath.IMPLEMENTATION == "py"
    else:
        assert fastpath.IMPLEMENTATION == "c", (
            "the compiled fast path did not load: rebuild it with `pip install -e . --no-build-isolation` "
            "or `python setup.py build_ext --inplace`"
        )
        assert fastpath.RcptMatcher.__module__ == "edgeproxy._fastpath"
