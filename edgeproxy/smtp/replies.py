"""Every reply the proxy sends itself, named, each with its RFC 3463 enhanced status code.

Tests compare against these constants rather than copied strings. Replies that an operator may
change (design.md §2 "Reply codes") live in the reply table in :mod:`edgeproxy.config`; their
defaults are here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REPLY_TEXT = re.compile(r"^([245]\d\d) ([245])\.(\d{1,3})\.(\d{1,3})(?: (.*))?$")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "5.7.1"; empty only for the greeting-style replies that carry none
    text: str

    @classmethod
    def parse(cls, value: str) -> Reply:
        """Parse ``"554 5.7.1 Relay access denied"``; raises ValueError when malformed.

        The code must be 4xx or 5xx and its class must match the enhanced code's (RFC 3463 §2).
        """
        match = _REPLY_TEXT.match(value.strip())
        if not match:
            raise ValueError("expected '<4xx|5xx> <class>.<subject>.<detail> <text>'")
        code, klass, subject, detail, text = match.groups()
        if code[0] not in "45":
            raise ValueError("the reply code must be 4xx or 5xx")
        if klass != code[0]:
            raise ValueError("the enhanced status code's class must match the reply code's")
        if text and any(ord(char) < 32 or ord(char) > 126 for char in text):
            raise ValueError("the text must be printable ASCII")
        return cls(int(code), f"{klass}.{subject}.{detail}", text or "")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".rstrip() if self.enhanced else f"{self.code} {self.text}"

    def encode(self) -> bytes:
        return (str(self) + "\r\n").encode("ascii")

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def softened(self) -> Reply:
        """The 4xx twin of a 5xx reply (soft-reject mode), else the reply itself."""
        if self.code < 500:
            return self
        return Reply(self.code - 100, "4" + self.enhanced[1:], self.text)


def multiline(code: int, lines: list[str]) -> bytes:
    """A multi-line reply (RFC 5321 §4.2.1): ``250-first``, ..., ``250 last``."""
    out = [f"{code}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{code} {lines[-1]}\r\n")
    return "".join(out).encode("utf-8")


# -- session ----------------------------------------------------------------------------------
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")

# -- protocol errors (RFC 5321 §4.2.2, §4.3.2) --------------------------------------------------
UNRECOGNIZED = Reply(500, "5.5.2", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BARE_LINE_END = Reply(500, "5.5.2", "Bare CR or LF in command line")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL in command line")
EIGHT_BIT_COMMAND = Reply(500, "5.6.7", "8-bit characters need SMTPUTF8")
BAD_UTF8 = Reply(500, "5.6.7", "Invalid UTF-8 in command line")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "HELO/EHLO needs a domain or address literal")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given")
NO_VALID_RECIPIENTS = Reply(503, "5.5.1", "No valid recipients")
NO_VALID_RECIPIENTS_AFTER_REJECTS = Reply(554, "5.5.1", "No valid recipients")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
PATH_TOO_LONG = Reply(501, "5.1.3", "Address too long")
PARAMETER_UNRECOGNIZED = Reply(555, "5.5.4", "MAIL/RCPT parameter not recognized or not implemented")
PARAMETER_BAD = Reply(501, "5.5.4", "Bad MAIL/RCPT parameter")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
SMTPUTF8_NOT_OFFERED = Reply(555, "5.6.7", "SMTPUTF8 was not offered")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
EARLY_TALKER = Reply(554, "5.5.0", "Talking before the greeting; goodbye")

# -- the body ---------------------------------------------------------------------------------
BODY_BARE_LINE_END = Reply(550, "5.6.0", "Message contains a bare CR or LF; refused")
BODY_LINE_TOO_LONG = Reply(550, "5.6.0", "Message contains a line over the length limit; refused")
BODY_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")

# -- temporary failures: always 4xx, so the sender retries (RFC 2505 §4) ---------------------
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
BACKEND_UNAVAILABLE = Reply(451, "4.4.1", "Mail server temporarily unavailable, try again later")
BACKEND_UNAVAILABLE_CLOSING = Reply(421, "4.4.1", "Mail server temporarily unavailable, closing connection")
BACKEND_FAILED_DATA = Reply(451, "4.4.2", "Mail server connection lost, message not accepted; try again")
LOCAL_ERROR = Reply(421, "4.3.0", "Local error, closing connection")

# -- policy replies: defaults of the configurable reply table ----------------------------------
POLICY_DEFAULTS: dict[str, Reply] = {
    "CONNECT_DENIED": Reply(554, "5.7.1", "Connection refused by policy"),
    "TOO_MANY_CONNECTIONS": Reply(421, "4.7.0", "Too many connections, try again later"),
    "RATE_LIMITED": Reply(421, "4.7.0", "Connection rate limit exceeded, try again later"),
    "SENDER_DENIED": Reply(550, "5.7.1", "Sender address rejected"),
    "RELAY_DENIED": Reply(554, "5.7.1", "Relay access denied"),
    "UNKNOWN_USER": Reply(550, "5.1.1", "Recipient address rejected: user unknown"),
    "TOO_MANY_RECIPIENTS": Reply(452, "4.5.3", "Too many recipients"),
    "MESSAGE_TOO_BIG": Reply(552, "5.3.4", "Message size exceeds fixed limit"),
}
# Rules that refuse relaying answer like RELAY_DENIED unless configured apart: a relay prober
# should not learn which of our rules caught it.
POLICY_INHERITS = {"ENCAPSULATED": "RELAY_DENIED", "RELAY_NEVER": "RELAY_DENIED"}
POLICY_RULES = (*POLICY_DEFAULTS, *POLICY_INHERITS)
