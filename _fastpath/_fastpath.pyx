# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled fast path: the same API and results as edgeproxy/_fastpath_py.py, faster.

What runs per line, per RCPT or per body chunk is typed C here: the command tokenizer, the
common shape of a path (``<local@domain.example>``), domain matching, CIDR lookups and the DATA
scanner. Rare shapes (quoted local parts, source routes, address literals, non-ASCII text, the
null path, bare ``postmaster``) are handed to the pure-Python twin's own code, so for them the
two cannot disagree; the differential test checks the rest on generated input.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8, PyUnicode_Substring
from libc.string cimport memchr, memcpy


cdef extern from *:
    """
    /* A 5-field NamedTuple instance, made as CPython's tuple_subtype_new makes one (tp_alloc,
       then the items), without a Python-level call to tuple.__new__ per result. */
    static PyObject* edgeproxy_tuple5(PyObject* type, PyObject* a, PyObject* b, PyObject* c,
                                      PyObject* d, PyObject* e) {
        PyTypeObject* tp = (PyTypeObject*) type;
        PyObject* self = tp->tp_alloc(tp, 5);
        if (self == NULL) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(self, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(self, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(self, 2, c);
        Py_INCREF(d); PyTuple_SET_ITEM(self, 3, d);
        Py_INCREF(e); PyTuple_SET_ITEM(self, 4, e);
        return self;
    }
    """
    object _tuple5 "edgeproxy_tuple5"(object type, object a, object b, object c, object d, object e)


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object text)
    const unsigned char* PyUnicode_1BYTE_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)

import ipaddress

import pytricia

from edgeproxy import _fastpath_py as _twin
from edgeproxy.fastpath_common import (
    ParsedPath,
    ParseError,
    RcptVerdict,
    local_key,
)

# C copies of edgeproxy.fastpath_common's constants, checked against it at import below.
cdef enum:
    ENC_PERCENT = 1
    ENC_BANG = 2
    ENC_MULTIPLE_AT = 16
    ENC_TRAILING = 32
    ENC_IP_LITERAL = 64
    ENC_IMCEA = 128
    GRANT_NONE = 0
    GRANT_AUTHENTICATED = 1
    GRANT_ALLOW_LIST = 2
    GRANT_LISTENER = 3
    GRANT_NEVER = 4
    ACTION_FORWARD = 0
    ACTION_REJECT = 1
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
    VIOLATION_NONE = 0
    VIOLATION_BARE_CR = 1
    VIOLATION_BARE_LF = 2
    VIOLATION_LINE_TOO_LONG = 3
    VIOLATION_TOO_BIG = 4
    MAX_LOCAL_PART = 64
    MAX_DOMAIN = 255
    MAX_LABEL = 63
    MAX_PATH = 256

from edgeproxy import fastpath_common as _common

assert (_common.ENC_PERCENT, _common.ENC_BANG, _common.ENC_MULTIPLE_AT, _common.ENC_TRAILING,
        _common.ENC_IP_LITERAL, _common.ENC_IMCEA) == (1, 2, 16, 32, 64, 128)
assert (_common.GRANT_NONE, _common.GRANT_AUTHENTICATED, _common.GRANT_ALLOW_LIST, _common.GRANT_LISTENER,
        _common.GRANT_NEVER) == (0, 1, 2, 3, 4)
# The C constructor above relies on both result types being plain 5-field tuple subclasses.
assert ParsedPath.__mro__[1] is tuple and len(ParsedPath._fields) == 5 and ParsedPath.__slots__ == ()
assert RcptVerdict.__mro__[1] is tuple and len(RcptVerdict._fields) == 5 and RcptVerdict.__slots__ == ()
assert (_common.RULE_LOCAL, _common.RULE_RELAY_DENIED, _common.VIOLATION_TOO_BIG,
        _common.MAX_PATH, _common.MAX_DOMAIN) == (0, 9, 4, 256, 255)

REASON_LINE_TOO_LONG = _common.REASON_LINE_TOO_LONG
REASON_BARE_CR = _common.REASON_BARE_CR
REASON_BARE_LF = _common.REASON_BARE_LF
REASON_NUL = _common.REASON_NUL
REASON_EIGHT_BIT = _common.REASON_EIGHT_BIT
REASON_BAD_UTF8 = _common.REASON_BAD_UTF8
REASON_SYNTAX = _common.REASON_SYNTAX
REASON_BAD_DOMAIN = _common.REASON_BAD_DOMAIN
REASON_PATH_TOO_LONG = _common.REASON_PATH_TOO_LONG



# ---------------------------------------------------------------------------------------------
# Command lines


def parse_command(bytes line, bint smtputf8, Py_ssize_t max_length):
    """Split one command line, CRLF included, into an upper-case verb and its argument."""
    cdef Py_ssize_t length = PyBytes_GET_SIZE(line)
    cdef const unsigned char* data = <const unsigned char*> PyBytes_AS_STRING(line)
    cdef Py_ssize_t index, body_length
    cdef unsigned char byte
    cdef bint eight_bit = False
    cdef bint saw_cr = False, saw_lf = False, saw_nul = False
    if length > max_length:
        raise ParseError(REASON_LINE_TOO_LONG)
    if length < 2 or data[length - 2] != 13 or data[length - 1] != 10:
        if length >= 1 and data[length - 1] == 10:
            raise ParseError(REASON_BARE_LF)
        raise ParseError(REASON_SYNTAX)
    body_length = length - 2
    for index in range(body_length):
        byte = data[index]
        if byte < 14:
            if byte == 13:
                saw_cr = True
            elif byte == 10:
                saw_lf = True
            elif byte == 0:
                saw_nul = True
        elif byte >= 128:
            eight_bit = True
    # The twin checks in this order; so must we, for identical reasons on mixed input.
    if saw_cr:
        raise ParseError(REASON_BARE_CR)
    if saw_lf:
        raise ParseError(REASON_BARE_LF)
    if saw_nul:
        raise ParseError(REASON_NUL)
    cdef str text
    if not eight_bit:
        text = PyUnicode_DecodeASCII(<const char*> data, body_length, NULL)
    elif not smtputf8:
        raise ParseError(REASON_EIGHT_BIT)
    else:
        try:
            text = PyUnicode_DecodeUTF8(<const char*> data, body_length, NULL)
        except UnicodeDecodeError:
            raise ParseError(REASON_BAD_UTF8) from None
    cdef Py_ssize_t space = text.find(" ")
    if space < 0:
        return text.upper(), ""
    return text[:space].upper(), text[space + 1:].rstrip(" ")


# ---------------------------------------------------------------------------------------------
# Domains


cdef inline bint _is_ldh(Py_UCS4 char):
    return (97 <= char <= 122) or (48 <= char <= 57) or char == 45


cdef str _canonical_ascii_domain(str text):
    """canonical_domain for an ASCII name that is not an address literal; None if not ASCII."""
    cdef Py_ssize_t length = len(text)
    cdef Py_ssize_t index, label_start = 0
    cdef Py_UCS4 char
    if length and text[length - 1] == ".":
        text = text[:length - 1]
        length -= 1
    if length == 0:
        raise ParseError(REASON_BAD_DOMAIN)
    text = text.lower()
    if length > MAX_DOMAIN:
        raise ParseError(REASON_BAD_DOMAIN)
    for index in range(length + 1):
        char = text[index] if index < length else 46
        if char == 46:
            if index == label_start or index - label_start > MAX_LABEL:
                raise ParseError(REASON_BAD_DOMAIN)
            if text[label_start] == "-" or text[index - 1] == "-":
                raise ParseError(REASON_BAD_DOMAIN)
            label_start = index + 1
        elif not _is_ldh(char):
            raise ParseError(REASON_BAD_DOMAIN)
    return text


def canonical_domain(str text):
    """Lower-case, IDNA A-label form of a domain or address literal, without a trailing dot."""
    if text and text[0] != "[" and text.isascii():
        return _canonical_ascii_domain(text)
    return _twin.canonical_domain(text)


cdef class DomainSet:
    """Exact domains and ``.suffix`` wildcards (which match every subdomain, not the apex)."""

    cdef frozenset _exact
    cdef frozenset _suffixes

    def __init__(self, entries):
        twin = _twin.DomainSet(entries)  # same validation, same error text
        self._exact = twin._exact
        self._suffixes = twin._suffixes

    def __contains__(self, domain):
        if not isinstance(domain, str):
            return False
        return self._contains(<str> domain)

    cdef bint _contains(self, str domain):
        cdef Py_ssize_t dot
        if domain in self._exact:
            return True
        if self._suffixes:
            dot = domain.find(".")
            while dot >= 0:
                if domain[dot:] in self._suffixes:
                    return True
                dot = domain.find(".", dot + 1)
        return False

    def __len__(self):
        return len(self._exact) + len(self._suffixes)

    def entries(self):
        return sorted(self._exact) + sorted(self._suffixes)


# ---------------------------------------------------------------------------------------------
# Paths


cdef inline bint _is_atext(Py_UCS4 char):
    # RFC 5322 atext plus ".": letters, digits and !#$%&'*+-/=?^_`{|}~
    if (97 <= char <= 122) or (65 <= char <= 90) or (48 <= char <= 57):
        return True
    return char in "!#$%&'*+-/=?^_`{|}~."


# 1 for every octet of RFC 5322 atext, and "."; built once at import.
cdef unsigned char _ATEXT_TABLE[256]
for _code in range(256):
    _ATEXT_TABLE[_code] = 1 if _code < 128 and _is_atext(_code) else 0


@cython.freelist(16)
cdef class _Path:
    """A parsed path inside this module, before it becomes a ParsedPath or a verdict."""

    cdef str address
    cdef str _local  # made on first use: most verdicts never need it
    cdef str _source
    cdef Py_ssize_t _local_start
    cdef Py_ssize_t _local_end
    cdef str domain
    cdef int flags
    cdef object params

    cdef str local(self):
        if self._local is None:
            self._local = PyUnicode_Substring(self._source, self._local_start, self._local_end)
        return self._local

    cdef object as_tuple(self):
        return _tuple5(ParsedPath, self.address, self.local(), self.domain, self.flags, self.params)


cdef _Path _from_twin(object parsed):
    cdef _Path path = _Path.__new__(_Path)
    path.address, path._local, path.domain, path.flags, path.params = parsed
    return path


cdef int _local_flags(const unsigned char* local, Py_ssize_t length) except -1:
    """_check_dot_string of the twin, on ASCII octets."""
    cdef Py_ssize_t index
    cdef int flags = 0
    cdef unsigned char char, previous = 46
    if length == 0:
        raise ParseError(REASON_SYNTAX)
    for index in range(length):
        char = local[index]
        if char == 64:
            flags |= ENC_MULTIPLE_AT
        elif char == 37:
            flags |= ENC_PERCENT
        elif char == 33:
            flags |= ENC_BANG
        elif not _ATEXT_TABLE[char]:
            raise ParseError(REASON_SYNTAX)
        if char == 46 and (previous == 46 or previous == 64):
            raise ParseError(REASON_SYNTAX)
        previous = char
    if previous == 46:
        raise ParseError(REASON_SYNTAX)
    if flags & ENC_MULTIPLE_AT and (local[0] == 64 or local[length - 1] == 64):
        flags |= ENC_TRAILING
    if length >= 5 and (local[0] | 32) == 105 and (local[1] | 32) == 109 and (local[2] | 32) == 99 \
            and (local[3] | 32) == 101 and (local[4] | 32) == 97:  # "IMCEA", any case
        index = 5
        while index < length and (48 <= local[index] <= 57 or 65 <= (local[index] & ~32) <= 90):
            index += 1
        if index < length and local[index] == 45:
            flags |= ENC_IMCEA
    return flags


cdef str _ascii_domain(const unsigned char* text, Py_ssize_t length, unsigned char* out):
    """_canonical_ascii_domain on octets: the lower-cased name written to ``out``."""
    cdef Py_ssize_t index, label_start = 0
    cdef unsigned char char
    if length and text[length - 1] == 46:
        length -= 1
    if length == 0 or length > MAX_DOMAIN:
        raise ParseError(REASON_BAD_DOMAIN)
    for index in range(length + 1):
        char = text[index] if index < length else 46
        if 65 <= char <= 90:
            char |= 32
        if char == 46:
            if index == label_start or index - label_start > MAX_LABEL:
                raise ParseError(REASON_BAD_DOMAIN)
            if out[label_start] == 45 or out[index - 1] == 45:
                raise ParseError(REASON_BAD_DOMAIN)
            label_start = index + 1
        elif not ((97 <= char <= 122) or (48 <= char <= 57) or char == 45):
            raise ParseError(REASON_BAD_DOMAIN)
        if index < length:
            out[index] = char
    return PyUnicode_DecodeASCII(<const char*> out, length, NULL)


cdef _Path _parse_path(str arg, Py_ssize_t start, bint recipient):
    """The common shape ``<local@domain> params`` in C; anything else in the twin's code."""
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(arg)
    cdef Py_ssize_t position, close, at, local_length
    cdef const unsigned char* data
    cdef const unsigned char* found
    cdef unsigned char address[MAX_PATH + 2]
    cdef _Path path
    if not PyUnicode_IS_ASCII(arg):
        return _from_twin(_twin._parse_path(arg, start, recipient))
    data = PyUnicode_1BYTE_DATA(arg)
    while start < length and data[start] == 32:
        start += 1
    if start >= length or data[start] != 60:
        raise ParseError(REASON_SYNTAX)
    position = start + 1
    if position < length and (data[position] == 64 or data[position] == 34):
        return _from_twin(_twin._parse_path(arg, start, recipient))  # source route, quoted local part
    found = <const unsigned char*> memchr(data + position, 62, length - position)
    if found == NULL:
        raise ParseError(REASON_SYNTAX)
    close = found - data
    at = close - 1
    while at >= position and data[at] != 64:
        at -= 1
    if at <= position or at + 1 == close or data[at + 1] == 91:
        return _from_twin(_twin._parse_path(arg, start, recipient))  # null path, postmaster, literal...
    local_length = at - position
    path = _Path.__new__(_Path)
    path.flags = _local_flags(data + position, local_length)
    if close - start - 1 > MAX_PATH or local_length > MAX_LOCAL_PART:
        raise ParseError(REASON_PATH_TOO_LONG)
    if data[close - 1] == 46:
        path.flags |= ENC_TRAILING
    # One buffer holds "local@domain": the domain is canonicalized straight into its place.
    memcpy(address, data + position, local_length + 1)
    path.domain = _ascii_domain(data + at + 1, close - at - 1, address + local_length + 1)
    path._source, path._local_start, path._local_end = arg, position, at
    path.address = PyUnicode_DecodeASCII(<const char*> address, local_length + 1 + PyUnicode_GET_LENGTH(path.domain),
                                         NULL)
    path.params = _twin._parse_params(arg, close + 1) if close + 1 < length else {}
    return path


def parse_mail_from(str arg):
    """Parse the argument of ``MAIL`` (``FROM:<path> params``); ``<>`` is the null path."""
    if arg[:5].upper() != "FROM:":
        raise ParseError(REASON_SYNTAX)
    return _parse_path(arg, 5, False).as_tuple()


def parse_rcpt_to(str arg):
    """Parse the argument of ``RCPT`` (``TO:<path> params``); ``<postmaster>`` has no domain."""
    if not _starts_with_to(arg):
        raise ParseError(REASON_SYNTAX)
    return _parse_path(arg, 3, True).as_tuple()


cdef inline bint _starts_with_to(str arg):
    """``arg[:3].upper() == "TO:"`` without the two new strings."""
    if PyUnicode_GET_LENGTH(arg) < 3:
        return False
    cdef Py_UCS4 t = arg[0], o = arg[1], colon = arg[2]
    return (t == 84 or t == 116) and (o == 79 or o == 111) and colon == 58


# ---------------------------------------------------------------------------------------------
# Addresses


cdef class CidrSet:
    """IPv4 and IPv6 prefixes in two patricia tries; IPv4-mapped clients match IPv4 entries."""

    cdef object _v4
    cdef object _v6

    def __init__(self, entries):
        self._v4 = pytricia.PyTricia(32)
        self._v6 = pytricia.PyTricia(128)
        for entry in entries:
            entry = entry.strip()
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"invalid address or prefix {entry!r}") from None
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
                else:
                    self._v6[str(network)] = True
                    continue
            self._v4[str(network)] = True

    def __contains__(self, address):
        if not isinstance(address, str):
            return False
        cdef str text = <str> address
        cdef Py_ssize_t percent
        if ":" not in text:
            return text in self._v4
        percent = text.find("%")
        if percent >= 0:
            text = text[:percent]
        if text[:7].lower() == "::ffff:" and "." in text:
            return text[7:] in self._v4
        return text in self._v6

    def __len__(self):
        return len(self._v4) + len(self._v6)


# ---------------------------------------------------------------------------------------------
# The RCPT verdict


cdef class RcptMatcher:
    """Design.md §2 "At RCPT TO", rules 1 to 6, in one call per recipient."""

    cdef DomainSet _local
    cdef DomainSet _relay
    cdef dict _rewrite
    cdef dict _directories

    def __init__(self, local_domains, relay_domains, rewrite, directories):
        self._local = local_domains if isinstance(local_domains, DomainSet) else DomainSet(local_domains.entries())
        self._relay = relay_domains if isinstance(relay_domains, DomainSet) else DomainSet(relay_domains.entries())
        self._rewrite = dict(rewrite)
        self._directories = dict(directories)

    def decide(self, str arg, int grant):
        """Decide one ``RCPT`` argument for a session holding ``grant`` (a ``GRANT_*``)."""
        if not _starts_with_to(arg):
            raise ParseError(REASON_SYNTAX)
        cdef _Path path = _parse_path(arg, 3, True)
        cdef str address = path.address
        cdef str domain = path.domain
        cdef int flags = path.flags
        cdef object directory
        if flags & ENC_IP_LITERAL and self._local._contains(domain):
            flags &= ~ENC_IP_LITERAL
        cdef bint may_relay = grant == GRANT_AUTHENTICATED or grant == GRANT_ALLOW_LIST or grant == GRANT_LISTENER
        if flags and not may_relay:
            return _verdict(ACTION_REJECT, RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_ENCAPSULATED,
                            address, domain, path.params)
        if not domain:
            if flags:
                raise ParseError(REASON_SYNTAX)  # "user@": no domain to decide on
            return _verdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
        if self._rewrite:
            target = self._rewrite.get(domain)
            if target is not None:
                domain = target
                address = path.local() + "@" + domain
        if self._local._contains(domain):
            directory = self._directories.get(domain) if self._directories else None
            if directory is None:
                return _verdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
            if local_key(path.local()) in directory:
                return _verdict(ACTION_FORWARD, RULE_LOCAL_DIRECTORY, address, domain, path.params)
            return _verdict(ACTION_REJECT, RULE_UNKNOWN_USER, address, domain, path.params)
        if self._relay._contains(domain):
            return _verdict(ACTION_FORWARD, RULE_RELAY_DOMAIN, address, domain, path.params)
        if grant == GRANT_AUTHENTICATED:
            return _verdict(ACTION_FORWARD, RULE_RELAY_AUTHENTICATED, address, domain, path.params)
        if grant == GRANT_ALLOW_LIST:
            return _verdict(ACTION_FORWARD, RULE_RELAY_ALLOW_LIST, address, domain, path.params)
        if grant == GRANT_LISTENER:
            return _verdict(ACTION_FORWARD, RULE_RELAY_LISTENER, address, domain, path.params)
        return _verdict(ACTION_REJECT, RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_RELAY_DENIED,
                        address, domain, path.params)


cdef inline object _verdict(int action, int rule, str address, str domain, object params):
    return _tuple5(RcptVerdict, action, rule, address, domain, params)


# ---------------------------------------------------------------------------------------------
# The DATA scanner


cdef class DataScanner:
    """Finds the end of a DATA body as chunks arrive, and what is wrong with it on the way.

    Only ``CRLF . CRLF`` ends the body; see the twin for the reasoning. The state machine is the
    twin's, octet for octet.
    """

    cdef public Py_ssize_t max_line_length
    cdef public Py_ssize_t max_size
    cdef public int violation
    cdef public Py_ssize_t size
    cdef Py_ssize_t _line_length
    cdef bint _after_cr
    cdef bint _starts_with_dot

    def __init__(self, Py_ssize_t max_line_length, Py_ssize_t max_size):
        self.max_line_length = max_line_length
        self.max_size = max_size
        self.violation = VIOLATION_NONE
        self.size = 0
        self._line_length = 0
        self._after_cr = False
        self._starts_with_dot = False

    cdef inline void _violate(self, int violation):
        if self.violation == VIOLATION_NONE:
            self.violation = violation

    cdef inline void _grow_line(self, Py_ssize_t octets):
        self._line_length += octets
        if self._line_length + 2 > self.max_line_length:
            self._violate(VIOLATION_LINE_TOO_LONG)

    def feed(self, bytes data):
        """Scan ``data``; return the index just past the end marker, or -1 if it is not in it."""
        cdef const unsigned char* buffer = <const unsigned char*> PyBytes_AS_STRING(data)
        cdef Py_ssize_t length = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t position = 0, stop
        cdef const unsigned char* newline
        cdef const unsigned char* carriage
        while position < length:
            if self._after_cr:
                self._after_cr = False
                if buffer[position] == 10:
                    position += 1
                    if self._line_length == 1 and self._starts_with_dot:
                        self.size += position - 3
                        if self.size > self.max_size:
                            self._violate(VIOLATION_TOO_BIG)
                        return position
                    self._line_length = 0
                    self._starts_with_dot = False
                    continue
                self._violate(VIOLATION_BARE_CR)
                self._grow_line(1)
            newline = <const unsigned char*> memchr(buffer + position, 10, length - position)
            stop = (newline - buffer) if newline != NULL else length
            carriage = <const unsigned char*> memchr(buffer + position, 13, stop - position)
            if carriage != NULL:
                stop = carriage - buffer
            if stop > position:
                if self._line_length == 0 and buffer[position] == 46:
                    self._starts_with_dot = True
                self._grow_line(stop - position)
            position = stop
            if stop == length:
                break
            position += 1
            if buffer[stop] == 13:
                self._after_cr = True
            else:
                self._violate(VIOLATION_BARE_LF)
                self._grow_line(1)
        self.size += length
        if self.size > self.max_size + 3:
            self._violate(VIOLATION_TOO_BIG)
        return -1
