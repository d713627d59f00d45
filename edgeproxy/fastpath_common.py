"""Constants and result types shared by both fast-path twins.

The compiled module and :mod:`edgeproxy._fastpath_py` import everything from here, so a result
or exception from one compares equal to the other's.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from edgeproxy.errors import ParseError

__all__ = ["ParseError", "ParsedPath", "RcptVerdict"]

# RFC 5321 §4.5.3.1 size limits, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_LABEL = 63

# Why a line or path was refused; the SMTP core maps each to its reply.
REASON_LINE_TOO_LONG = "line_too_long"
REASON_BARE_CR = "bare_cr"
REASON_BARE_LF = "bare_lf"
REASON_NUL = "nul"
REASON_EIGHT_BIT = "eight_bit"
REASON_BAD_UTF8 = "bad_utf8"
REASON_SYNTAX = "syntax"
REASON_BAD_DOMAIN = "bad_domain"
REASON_PATH_TOO_LONG = "path_too_long"
REASON_BAD_PARAMETER = "bad_parameter"
REASON_NULL_RECIPIENT = "null_recipient"

# Encapsulation forms (design.md §2, RCPT rule 2): bits of ParsedPath.flags.
ENC_PERCENT = 1 << 0  # user%foreign@local
ENC_BANG = 1 << 1  # foreign!user@local
ENC_SOURCE_ROUTE = 1 << 2  # @a,@b:user@c
ENC_QUOTED = 1 << 3  # "user@foreign"@local
ENC_MULTIPLE_AT = 1 << 4  # user@foreign@local
ENC_TRAILING = 1 << 5  # user@local. or user@local@
ENC_IP_LITERAL = 1 << 6  # user@[192.0.2.1]; harmless only when the literal is one of ours
ENC_IMCEA = 1 << 7  # IMCEASMTP-user+40foreign+2Ecom@local

ENCAPSULATION_NAMES = {
    ENC_PERCENT: "percent",
    ENC_BANG: "bang",
    ENC_SOURCE_ROUTE: "source_route",
    ENC_QUOTED: "quoted",
    ENC_MULTIPLE_AT: "multiple_at",
    ENC_TRAILING: "trailing",
    ENC_IP_LITERAL: "ip_literal",
    ENC_IMCEA: "imcea",
}

# What the session may do with foreign domains, decided at connect and on AUTH.
GRANT_NONE = 0
GRANT_AUTHENTICATED = 1
GRANT_ALLOW_LIST = 2
GRANT_LISTENER = 3
GRANT_NEVER = 4  # the NEVER list overrides every permission

ACTION_FORWARD = 0
ACTION_REJECT = 1

# Which RCPT rule decided (design.md §2). Each rejecting rule has a configurable reply.
RULE_LOCAL = 0
RULE_LOCAL_DIRECTORY = 1
RULE_RELAY_DOMAIN = 2
RULE_RELAY_AUTHENTICATED = 3
RULE_RELAY_ALLOW_LIST = 4
RULE_RELAY_LISTENER = 5
RULE_ENCAPSULATED = 6
RULE_UNKNOWN_USER = 7
RULE_RELAY_NEVER = 8
RULE_RELAY_DENIED = 9

RULE_NAMES = (
    "local",
    "local_directory",
    "relay_domain",
    "relay_authenticated",
    "relay_allow_list",
    "relay_listener",
    "encapsulated",
    "unknown_user",
    "relay_never",
    "relay_denied",
)

# Body scanner findings, in order of precedence for the reply.
VIOLATION_NONE = 0
VIOLATION_BARE_CR = 1
VIOLATION_BARE_LF = 2
VIOLATION_LINE_TOO_LONG = 3
VIOLATION_TOO_BIG = 4
VIOLATION_NUL = 5  # a lenient backend that strips NUL would read "\x00." as the end of data


def local_key(local: str) -> str:
    """A local part as directories and deny lists know it: unquoted and case-folded.

    ``"john.doe"`` and ``john.doe`` are one mailbox (RFC 5321 §4.1.2); quoting must neither hide
    a listed sender nor turn away a listed recipient.
    """
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local.lower()


class ParsedPath(NamedTuple):
    """A parsed ``MAIL FROM`` or ``RCPT TO`` argument.

    ``address`` is what goes to the backend: the mailbox with its canonical domain and without
    a source route; empty for the null path.
    """

    address: str
    local: str
    domain: str
    flags: int
    params: dict[str, str | None]


class RcptVerdict(NamedTuple):
    action: int
    rule: int
    address: str
    domain: str
    params: dict[str, str | None]
