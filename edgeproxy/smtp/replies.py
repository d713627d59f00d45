"""Every reply the proxy sends itself, named, each with its RFC 3463 enhanced status code.

Tests compare against these constants rather than copied strings. Replies that an operator may
change (design.md §2 "Reply codes") belong to the policy: their defaults are in
:mod:`edgeproxy.refusals`.
"""

from __future__ import annotations

from edgeproxy import fastpath_common as fc
from edgeproxy.reply import Reply as Reply
from edgeproxy.reply import multiline as multiline

# -- session ----------------------------------------------------------------------------------
CLOSING = Reply(221, "2.0.0", "Bye")
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

# -- protocol errors (RFC 5321 §4.2.2, §4.3.2) --------------------------------------------------
UNRECOGNIZED = Reply(500, "5.5.2", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.6", "Line too long")
BARE_LINE_END = Reply(500, "5.5.2", "Bare CR or LF in command line")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL in command line")
EIGHT_BIT_COMMAND = Reply(500, "5.6.7", "8-bit characters need SMTPUTF8")
BAD_UTF8 = Reply(500, "5.6.7", "Invalid UTF-8 in command line")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_NEEDS_DOMAIN = Reply(501, "5.5.4", "HELO/EHLO needs a domain or address literal")
HELO_BAD_CHARACTERS = Reply(501, "5.5.2", "Control characters in the HELO/EHLO argument")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send HELO or EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL before RCPT")
NEED_MAIL_BEFORE_DATA = Reply(503, "5.5.1", "Need MAIL before DATA")
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
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# -- AUTH (RFC 4954 §6) -----------------------------------------------------------------------
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_BLOCKED = Reply(454, "4.7.0", "Too many authentication failures, try again later")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
EARLY_TALKER = Reply(554, "5.5.0", "Talking before the greeting; goodbye")
# The fast path says why a command line is unreadable; this is what the client hears.
FOR_COMMAND_FAULT = {
    fc.REASON_LINE_TOO_LONG: LINE_TOO_LONG,
    fc.REASON_BARE_CR: BARE_LINE_END,
    fc.REASON_BARE_LF: BARE_LINE_END,
    fc.REASON_NUL: NUL_IN_COMMAND,
    fc.REASON_EIGHT_BIT: EIGHT_BIT_COMMAND,
    fc.REASON_BAD_UTF8: BAD_UTF8,
}

# -- the body ---------------------------------------------------------------------------------
BODY_BARE_LINE_END = Reply(550, "5.6.0", "Message contains a bare CR or LF; refused")
BODY_LINE_TOO_LONG = Reply(550, "5.6.0", "Message contains a line over the length limit; refused")
BODY_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
BODY_NUL = Reply(550, "5.6.0", "Message contains a NUL octet; refused")

# -- temporary failures: always 4xx, so the sender retries (RFC 2505 §4) ---------------------
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit exceeded, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
BACKEND_UNAVAILABLE = Reply(451, "4.4.1", "Mail server temporarily unavailable, try again later")
BACKEND_UNAVAILABLE_CLOSING = Reply(421, "4.4.1", "Mail server temporarily unavailable, closing connection")
BACKEND_TLS_FAILED = Reply(451, "4.7.5", "Cannot secure the connection to the mail server, try again later")
BACKEND_BUSY = Reply(451, "4.3.2", "Mail server busy, try again later")
BACKEND_FAILED_DATA = Reply(451, "4.4.2", "Mail server connection lost, message not accepted; try again")
LOCAL_ERROR = Reply(421, "4.3.0", "Local error, closing connection")
