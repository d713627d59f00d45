"""A broken build must not pass by falling back to the pure-Python twin."""

from __future__ import annotations

import os

import pytest

from edgeproxy import fastpath
from edgeproxy.config import Settings
from edgeproxy.errors import ConfigError


def test_the_compiled_fast_path_runs_unless_switched_off() -> None:
    if fastpath.parse_no_extensions(os.environ.get("EDGEPROXY_NO_EXTENSIONS")):
        assert fastpath.IMPLEMENTATION == "py"
    else:
        assert fastpath.IMPLEMENTATION == "c", (
            "the compiled fast path did not load: rebuild it with `pip install -e . --no-build-isolation` "
            "or `python setup.py build_ext --inplace`"
        )
        assert fastpath.RcptMatcher.__module__ == "edgeproxy._fastpath"


@pytest.mark.parametrize(("text", "forced"), [("1", True), ("yes", True), ("", False), (" no ", False), ("0", False)])
def test_the_switch_reads_the_same_in_the_selector_and_the_configuration(text: str, forced: bool) -> None:
    # One reading: an empty value is "not set" for both, where it used to be an error for one.
    assert fastpath.parse_no_extensions(text) is forced
    settings = Settings.from_env({"EDGEPROXY_HOSTNAME": "proxy.test", "EDGEPROXY_NO_EXTENSIONS": text})
    assert settings.no_extensions is forced


def test_a_bad_switch_stops_the_configuration() -> None:
    with pytest.raises(ValueError):
        fastpath.parse_no_extensions("perhaps")
    with pytest.raises(ConfigError, match="EDGEPROXY_NO_EXTENSIONS='perhaps'"):
        Settings.from_env({"EDGEPROXY_HOSTNAME": "proxy.test", "EDGEPROXY_NO_EXTENSIONS": "perhaps"})
