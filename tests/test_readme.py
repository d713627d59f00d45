"""README.md is what operators read: keep its promises checked."""

from __future__ import annotations

import re
from pathlib import Path

from edgeproxy.config import markdown_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_configuration_table_matches_the_code() -> None:
    match = re.search(r"<!-- config-table:start -->\n(.*)\n<!-- config-table:end -->", README, re.S)
    assert match is not None
    assert match.group(1).strip() == markdown_table().strip()


def test_readme_opens_with_the_install_and_test_commands() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)[:2]
    assert commands[0] == "pip install . && edgeproxy serve"
    assert "python -m pytest" in commands[1]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    for command in ("python -m pytest", "EDGEPROXY_NO_EXTENSIONS=1 python -m pytest"):
        assert command in commands[1] and command in ci
