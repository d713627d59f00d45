"""Picks the compiled fast path or its pure-Python twin, once, at import.

``EDGEPROXY_NO_EXTENSIONS=1`` forces the twin. Otherwise the compiled module is used when it
imports; ``IMPLEMENTATION`` says which one runs ("c" or "py"), and the test suite fails when it is
"py" without the switch, so a broken build cannot pass by falling back quietly.
"""

from __future__ import annotations

import os

from edgeproxy.fastpath_common import ParsedPath, ParseError, RcptVerdict

_ON = ("1", "true", "yes")
_OFF = ("", "0", "false", "no")


def parse_no_extensions(text: str | None) -> bool:
    """The one reading of ``EDGEPROXY_NO_EXTENSIONS``, shared by this module, the configuration
    and the tests: 1/true/yes forces the twin; unset, empty and 0/false/no do not; anything else
    raises ValueError (the configuration reports it; this module's import treats it as unset)."""
    value = (text or "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError("expected one of 1/true/yes/0/false/no, or empty")


def _twin_forced() -> bool:
    try:
        return parse_no_extensions(os.environ.get("EDGEPROXY_NO_EXTENSIONS"))
    except ValueError:
        return False


if _twin_forced():
    from edgeproxy import _fastpath_py as _impl

    IMPLEMENTATION = "py"
else:
    try:
        from edgeproxy import _fastpath as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "c"
    except ImportError:
        from edgeproxy import _fastpath_py as _impl

        IMPLEMENTATION = "py"

parse_command = _impl.parse_command
parse_mail_from = _impl.parse_mail_from
parse_rcpt_to = _impl.parse_rcpt_to
canonical_domain = _impl.canonical_domain
DomainSet = _impl.DomainSet
CidrSet = _impl.CidrSet
RcptMatcher = _impl.RcptMatcher
DataScanner = _impl.DataScanner

__all__ = [
    "IMPLEMENTATION",
    "CidrSet",
    "DataScanner",
    "DomainSet",
    "ParseError",
    "ParsedPath",
    "RcptMatcher",
    "RcptVerdict",
    "canonical_domain",
    "parse_command",
    "parse_mail_from",
    "parse_no_extensions",
    "parse_rcpt_to",
]
