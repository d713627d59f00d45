# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled fast path: the same API and results as edgeproxy/_fastpath_py.py, faster.

What runs per line, per RCPT or per body chunk is typed C here, working on the octets of ASCII
text: the command tokenizer, the common shape of a path (``<local@domain.example> params``),
domain matching, CIDR lookups, the RCPT verdict and the DATA scanner. Rare shapes (quoted local
parts, source routes, address literals, non-ASCII text, the null path, bare ``postmaster``,
arguments of an unexpected type) are handed to the pure-Python twin's own code, so for them the
two cannot disagree; tests/test_fastpath_differential.py checks the rest on generated input.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8, PyUnicode_Substring
from libc.stdint cimport uint32_t
from libc.string cimport memchr, memcpy


cdef extern from *:
    """
    /* The first LF or NUL octet at or after p. The buffer must hold a NUL octet after its data,
       as those of bytes and bytearray objects do (their C API guarantees one): that NUL stops
       the search at the end. strchrnul is libc's vectorised scan for a byte or NUL (glibc, musl,
       FreeBSD); elsewhere a plain loop does the same. */
    static inline const unsigned char* edgeproxy_lf_or_nul(const unsigned char* p) {
    #if defined(__linux__) || defined(__FreeBSD__)
        return (const unsigned char*) strchrnul((const char*) p, '\\n');
    #else
        while (*p != '\\n' && *p != 0) p++;
        return p;
    #endif
    }
    """
    const unsigned char* _lf_or_nul "edgeproxy_lf_or_nul"(const unsigned char* p) noexcept


cdef extern from *:
    """
    /* A 5-field NamedTuple instance, made as CPython's tuple_subtype_new makes one (tp_alloc,
       then the items), without a Python-level call to tuple.__new__ per result: that call was
       a third of the cost of a whole RCPT verdict. */
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
    # Writable: strings made by PyUnicode_New below are filled in place before anyone sees them.
    unsigned char* PyUnicode_1BYTE_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)


import ipaddress

import pytricia

from edgeproxy import _fastpath_py as _twin
from edgeproxy import fastpath_common as _common
from edgeproxy.fastpath_common import ParsedPath, ParseError, RcptVerdict, local_key

# C copies of edgeproxy.fastpath_common's constants (C code needs compile-time values), checked
# against it at import below, so the two cannot drift apart silently.
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
    VIOLATION_NUL = 5
    MAX_LOCAL_PART = 64
    MAX_DOMAIN = 255
    MAX_LABEL = 63
    MAX_PATH = 256

if (
    (_common.ENC_PERCENT, _common.ENC_BANG, _common.ENC_MULTIPLE_AT, _common.ENC_TRAILING,
     _common.ENC_IP_LITERAL, _common.ENC_IMCEA) != (1, 2, 16, 32, 64, 128)
    or (_common.GRANT_NONE, _common.GRANT_AUTHENTICATED, _common.GRANT_ALLOW_LIST, _common.GRANT_LISTENER,
        _common.GRANT_NEVER) != (0, 1, 2, 3, 4)
    or (_common.ACTION_FORWARD, _common.ACTION_REJECT) != (0, 1)
    or (_common.RULE_LOCAL, _common.RULE_LOCAL_DIRECTORY, _common.RULE_RELAY_DOMAIN,
        _common.RULE_RELAY_AUTHENTICATED, _common.RULE_RELAY_ALLOW_LIST, _common.RULE_RELAY_LISTENER,
        _common.RULE_ENCAPSULATED, _common.RULE_UNKNOWN_USER, _common.RULE_RELAY_NEVER,
        _common.RULE_RELAY_DENIED) != tuple(range(10))
    or (_common.VIOLATION_NONE, _common.VIOLATION_BARE_CR, _common.VIOLATION_BARE_LF,
        _common.VIOLATION_LINE_TOO_LONG, _common.VIOLATION_TOO_BIG,
        _common.VIOLATION_NUL) != (0, 1, 2, 3, 4, 5)
    or (_common.MAX_LOCAL_PART, _common.MAX_DOMAIN, _common.MAX_LABEL, _common.MAX_PATH) != (64, 255, 63, 256)
    # edgeproxy_tuple5 relies on both result types being plain 5-field tuple subclasses.
    or ParsedPath.__mro__[1] is not tuple or len(ParsedPath._fields) != 5 or ParsedPath.__slots__ != ()
    or RcptVerdict.__mro__[1] is not tuple or len(RcptVerdict._fields) != 5 or RcptVerdict.__slots__ != ()
):
    raise ImportError("edgeproxy._fastpath was built against other fastpath_common constants: rebuild it")

REASON_LINE_TOO_LONG = _common.REASON_LINE_TOO_LONG
REASON_BARE_CR = _common.REASON_BARE_CR
REASON_BARE_LF = _common.REASON_BARE_LF
REASON_NUL = _common.REASON_NUL
REASON_EIGHT_BIT = _common.REASON_EIGHT_BIT
REASON_BAD_UTF8 = _common.REASON_BAD_UTF8
REASON_SYNTAX = _common.REASON_SYNTAX
REASON_BAD_DOMAIN = _common.REASON_BAD_DOMAIN
REASON_PATH_TOO_LONG = _common.REASON_PATH_TOO_LONG
REASON_BAD_PARAMETER = _common.REASON_BAD_PARAMETER


# ---------------------------------------------------------------------------------------------
# Octet classes, built once at import

# Command-line octets the tokenizer refuses, as bits, so one OR per octet classifies a line.
cdef enum:
    LINE_CR = 1
    LINE_LF = 2
    LINE_NUL = 4
    LINE_EIGHT_BIT = 8

cdef unsigned char _LINE_CLASS[256]
cdef unsigned char _ATEXT[256]  # RFC 5322 atext, plus "."
cdef unsigned char _LDH[256]  # a lower-cased domain label: letters, digits, "-"
cdef unsigned char _PARAM_KEY[256]  # an ESMTP keyword: letters, digits, "-"
cdef unsigned char _PARAM_VALUE[256]  # an ESMTP value: no control, space, "=" or DEL
cdef unsigned char _LOWER[256]

for _code in range(256):
    _LINE_CLASS[_code] = (LINE_CR if _code == 13 else LINE_LF if _code == 10 else LINE_NUL if _code == 0
                          else LINE_EIGHT_BIT if _code >= 128 else 0)
    _ATEXT[_code] = _code < 128 and chr(_code) in _twin._ATEXT
    _LDH[_code] = _code < 128 and chr(_code) in _twin._LDH
    _PARAM_KEY[_code] = _code < 128 and chr(_code) in _twin._PARAM_KEY
    _PARAM_VALUE[_code] = not (_code < 33 or _code == 61 or _code == 127)
    _LOWER[_code] = _code + 32 if 65 <= _code <= 90 else _code


cdef inline unsigned char _upper(unsigned char char) noexcept:
    return char - 32 if 97 <= char <= 122 else char


cdef str _ascii_upper(const unsigned char* data, Py_ssize_t length):
    """A new str of ``length`` ASCII octets, upper-cased while copied (no intermediate string)."""
    cdef object text = PyUnicode_New(length, 127)
    cdef unsigned char* out = PyUnicode_1BYTE_DATA(text)
    cdef Py_ssize_t index
    for index in range(length):
        out[index] = _upper(data[index])
    return <str> text


cdef inline str _ascii(const unsigned char* data, Py_ssize_t length):
    return PyUnicode_DecodeASCII(<const char*> data, length, NULL)


# ---------------------------------------------------------------------------------------------
# Command lines


cdef bint _as_size(object value, Py_ssize_t* out):
    """Store an int that fits a Py_ssize_t in ``out``; False for anything else (left to the twin)."""
    if type(value) is not int:
        return False
    try:
        out[0] = value
    except OverflowError:
        return False
    return True


def parse_command(line, smtputf8, max_length):
    """Split one command line, CRLF included, into an upper-case verb and its argument.

    Works on the octets and decodes each part once: the verb is upper-cased while copied, and
    the trailing blanks of the argument are dropped before decoding. In UTF-8 the octet 0x20 is
    only ever a space, so splitting octets is splitting characters.
    """
    cdef Py_ssize_t limit = 0
    if type(line) is not bytes or not _as_size(max_length, &limit):
        return _twin.parse_command(line, smtputf8, max_length)  # bytearray and odder types
    cdef Py_ssize_t length = PyBytes_GET_SIZE(line)
    cdef const unsigned char* data = <const unsigned char*> PyBytes_AS_STRING(line)
    cdef Py_ssize_t index, body_length, verb_length, argument_start, argument_end
    cdef unsigned char found = 0
    cdef const unsigned char* space
    if length > limit:
        raise ParseError(REASON_LINE_TOO_LONG)
    if length < 2 or data[length - 2] != 13 or data[length - 1] != 10:
        if length >= 1 and data[length - 1] == 10:
            raise ParseError(REASON_BARE_LF)
        raise ParseError(REASON_SYNTAX)
    body_length = length - 2
    for index in range(body_length):
        found |= _LINE_CLASS[data[index]]
    # The twin checks in this order; so must we, for identical reasons on mixed input.
    if found & LINE_CR:
        raise ParseError(REASON_BARE_CR)
    if found & LINE_LF:
        raise ParseError(REASON_BARE_LF)
    if found & LINE_NUL:
        raise ParseError(REASON_NUL)
    if found & LINE_EIGHT_BIT and not smtputf8:
        raise ParseError(REASON_EIGHT_BIT)
    space = <const unsigned char*> memchr(data, 32, body_length)
    verb_length = (space - data) if space != NULL else body_length
    argument_start = verb_length + 1
    argument_end = body_length
    while argument_end > argument_start and data[argument_end - 1] == 32:
        argument_end -= 1
    if not found & LINE_EIGHT_BIT:
        verb = _ascii_upper(data, verb_length)
        argument = _ascii(data + argument_start, argument_end - argument_start) if space != NULL else ""
        return verb, argument
    try:
        verb = PyUnicode_DecodeUTF8(<const char*> data, verb_length, NULL)
        argument = (PyUnicode_DecodeUTF8(<const char*> data + argument_start, argument_end - argument_start, NULL)
                    if space != NULL else "")
    except UnicodeDecodeError:
        raise ParseError(REASON_BAD_UTF8) from None
    return verb.upper(), argument


# ---------------------------------------------------------------------------------------------
# Domains


cdef str _ascii_domain(const unsigned char* text, Py_ssize_t length):
    """canonical_domain of ASCII octets that are not an address literal, in one pass."""
    cdef Py_ssize_t index, label_start = 0
    cdef unsigned char char
    cdef object result
    cdef unsigned char* out
    if length and text[length - 1] == 46:
        length -= 1
    if length == 0 or length > MAX_DOMAIN:
        raise ParseError(REASON_BAD_DOMAIN)
    result = PyUnicode_New(length, 127)
    out = PyUnicode_1BYTE_DATA(result)
    for index in range(length + 1):
        char = _LOWER[text[index]] if index < length else 46
        if char == 46:
            if index == label_start or index - label_start > MAX_LABEL:
                raise ParseError(REASON_BAD_DOMAIN)
            if out[label_start] == 45 or out[index - 1] == 45:
                raise ParseError(REASON_BAD_DOMAIN)
            label_start = index + 1
        elif not _LDH[char]:
            raise ParseError(REASON_BAD_DOMAIN)
        if index < length:
            out[index] = char
    return <str> result


def canonical_domain(text):
    """Lower-case, IDNA A-label form of a domain or address literal, without a trailing dot."""
    if type(text) is str and PyUnicode_IS_ASCII(text) and PyUnicode_GET_LENGTH(text) and PyUnicode_1BYTE_DATA(text)[0] != 91:
        return _ascii_domain(PyUnicode_1BYTE_DATA(text), PyUnicode_GET_LENGTH(text))
    return _twin.canonical_domain(text)  # IDNA, address literals, the empty string, odd types


cdef class DomainSet:
    """Exact domains and ``.suffix`` wildcards (which match every subdomain, not the apex)."""

    cdef readonly frozenset _exact  # readable, so the twin's code can run on this set
    cdef readonly frozenset _suffixes
    # _suffix_length[n] is set when some suffix is n characters long: a candidate suffix of
    # another length cannot match, so it is never sliced out of the domain.
    cdef unsigned char _suffix_length[MAX_DOMAIN + 2]

    def __init__(self, entries):
        twin = _twin.DomainSet(entries)  # the same validation and the same error text
        self._exact = twin._exact
        self._suffixes = twin._suffixes
        for suffix in self._suffixes:
            self._suffix_length[len(suffix)] = 1

    def __contains__(self, domain):
        """``domain`` must already be canonical (as ParsedPath.domain is)."""
        if type(domain) is str:
            return self._contains(<str> domain)
        return _twin.DomainSet.__contains__(self, domain)  # str subclasses and other types

    cdef bint _contains(self, str domain) except -1:
        cdef Py_ssize_t length, dot
        if domain in self._exact:
            return True
        if not self._suffixes:
            return False
        length = PyUnicode_GET_LENGTH(domain)
        dot = domain.find(".")
        while dot >= 0:
            if length - dot <= MAX_DOMAIN + 1 and self._suffix_length[length - dot]:
                if PyUnicode_Substring(domain, dot, length) in self._suffixes:
                    return True
            dot = domain.find(".", dot + 1)
        return False

    def __len__(self):
        return len(self._exact) + len(self._suffixes)

    def entries(self):
        return sorted(self._exact) + sorted(self._suffixes)


# ---------------------------------------------------------------------------------------------
# Paths


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
    cdef dict params

    cdef str local(self):
        if self._local is None:
            self._local = PyUnicode_Substring(self._source, self._local_start, self._local_end)
        return self._local


cdef _Path _from_twin(object parsed):
    cdef _Path path = _Path.__new__(_Path)
    path.address, path._local, path.domain, path.flags, path.params = parsed
    return path


cdef int _local_flags(const unsigned char* local, Py_ssize_t length) except -1:
    """The twin's _check_dot_string, on ASCII octets."""
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
        elif not _ATEXT[char]:
            raise ParseError(REASON_SYNTAX)
        if char == 46 and (previous == 46 or previous == 64):
            raise ParseError(REASON_SYNTAX)
        previous = char
    if previous == 46:
        raise ParseError(REASON_SYNTAX)
    if flags & ENC_MULTIPLE_AT and (local[0] == 64 or local[length - 1] == 64):
        flags |= ENC_TRAILING
    if (length >= 5 and _upper(local[0]) == 73 and _upper(local[1]) == 77 and _upper(local[2]) == 67
            and _upper(local[3]) == 69 and _upper(local[4]) == 65):  # "IMCEA", any case
        index = 5
        while index < length and (48 <= local[index] <= 57 or 65 <= _upper(local[index]) <= 90):
            index += 1
        if index < length and local[index] == 45:
            flags |= ENC_IMCEA
    return flags


cdef dict _ascii_params(const unsigned char* data, Py_ssize_t position, Py_ssize_t length):
    """The twin's _parse_params on ASCII octets: ``data[position:length]`` after the path."""
    cdef dict params = {}
    cdef Py_ssize_t end, key_end, index
    cdef const unsigned char* found
    if position >= length:
        return params
    if data[position] != 32:
        raise ParseError(REASON_SYNTAX)
    position += 1
    while position < length:
        if data[position] == 32:
            position += 1  # runs of blanks between parameters
            continue
        found = <const unsigned char*> memchr(data + position, 32, length - position)
        end = (found - data) if found != NULL else length
        found = <const unsigned char*> memchr(data + position, 61, end - position)
        key_end = (found - data) if found != NULL else end
        if key_end == position or data[position] == 45:
            raise ParseError(REASON_BAD_PARAMETER)
        for index in range(position, key_end):
            if not _PARAM_KEY[data[index]]:
                raise ParseError(REASON_BAD_PARAMETER)
        if key_end == end:
            params[_ascii_upper(data + position, key_end - position)] = None
        else:
            if key_end + 1 == end:
                raise ParseError(REASON_BAD_PARAMETER)
            for index in range(key_end + 1, end):
                if not _PARAM_VALUE[data[index]]:
                    raise ParseError(REASON_BAD_PARAMETER)
            params[_ascii_upper(data + position, key_end - position)] = _ascii(data + key_end + 1, end - key_end - 1)
        position = end
    return params


cdef _Path _parse_path(str arg, Py_ssize_t start, bint recipient):
    """The common shape ``<local@domain> params`` in C; anything else in the twin's code."""
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(arg)
    cdef Py_ssize_t position, close, at, local_length
    cdef const unsigned char* data
    cdef const unsigned char* found
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
    # No "@", an empty local part or domain, a trailing "@" (the twin strips it) or an address
    # literal: null path, postmaster, encapsulations and literals, all rare.
    if at <= position or at + 1 == close or data[at + 1] == 91:
        return _from_twin(_twin._parse_path(arg, start, recipient))
    local_length = at - position
    path = _Path.__new__(_Path)
    path.flags = _local_flags(data + position, local_length)
    if close - start - 1 > MAX_PATH or local_length > MAX_LOCAL_PART:
        raise ParseError(REASON_PATH_TOO_LONG)
    if data[close - 1] == 46:
        path.flags |= ENC_TRAILING
    path.domain = _ascii_domain(data + at + 1, close - at - 1)
    path._source, path._local_start, path._local_end = arg, position, at
    path.address = _address(data + position, local_length, path.domain)
    path.params = _ascii_params(data, close + 1, length)
    return path


cdef str _address(const unsigned char* local, Py_ssize_t local_length, str domain):
    """``local + "@" + domain`` for an ASCII local part, as one new string."""
    cdef Py_ssize_t domain_length = PyUnicode_GET_LENGTH(domain)
    cdef object address = PyUnicode_New(local_length + 1 + domain_length, 127)
    cdef unsigned char* out = PyUnicode_1BYTE_DATA(address)
    memcpy(out, local, local_length)
    out[local_length] = 64
    memcpy(out + local_length + 1, PyUnicode_1BYTE_DATA(domain), domain_length)
    return <str> address


cdef inline bint _has_prefix(str arg, const char* prefix, Py_ssize_t length) noexcept:
    """``arg[:length].upper() == prefix`` for an upper-case ASCII ``prefix``, when ``arg`` is ASCII."""
    cdef const unsigned char* data = PyUnicode_1BYTE_DATA(arg)
    cdef Py_ssize_t index
    if PyUnicode_GET_LENGTH(arg) < length:
        return False
    for index in range(length):
        if _upper(data[index]) != <unsigned char> prefix[index]:
            return False
    return True


def parse_mail_from(arg):
    """Parse the argument of ``MAIL`` (``FROM:<path> params``); ``<>`` is the null path."""
    if type(arg) is not str:
        return _twin.parse_mail_from(arg)
    if PyUnicode_IS_ASCII(arg):
        if not _has_prefix(arg, "FROM:", 5):
            raise ParseError(REASON_SYNTAX)
    elif arg[:5].upper() != "FROM:":  # str.upper() as the twin does, for non-ASCII text
        raise ParseError(REASON_SYNTAX)
    return _as_parsed(_parse_path(arg, 5, False))


cdef _Path _parse_rcpt(object arg):
    if type(arg) is not str:
        return _from_twin(_twin.parse_rcpt_to(arg))
    if PyUnicode_IS_ASCII(arg):
        if not _has_prefix(arg, "TO:", 3):
            raise ParseError(REASON_SYNTAX)
    elif arg[:3].upper() != "TO:":
        raise ParseError(REASON_SYNTAX)
    return _parse_path(arg, 3, True)


def parse_rcpt_to(arg):
    """Parse the argument of ``RCPT`` (``TO:<path> params``); ``<postmaster>`` has no domain."""
    return _as_parsed(_parse_rcpt(arg))


cdef inline object _as_parsed(_Path path):
    return _tuple5(ParsedPath, path.address, path.local(), path.domain, path.flags, path.params)


# ---------------------------------------------------------------------------------------------
# Addresses


cdef object _v4_key(const unsigned char* text, Py_ssize_t length):
    """A dotted-quad address as the integer pytricia takes, or None if it is anything else.

    Accepts exactly what glibc's inet_pton(AF_INET) accepts (four decimal octets up to 255, no
    leading zeros), which is how pytricia parses text keys; so the lookup is the same one, with
    pytricia's own parsing skipped. Everything else (prefixes, NULs, junk) keeps going to
    pytricia as text, so its quirks stay the twin's quirks.
    """
    cdef uint32_t address = 0, octet = 0
    cdef int octets = 0, digits = 0
    cdef Py_ssize_t index
    cdef unsigned char char
    if length < 7 or length > 15:
        return None
    for index in range(length):
        char = text[index]
        if 48 <= char <= 57:
            if digits and octet == 0:
                return None  # a leading zero
            octet = octet * 10 + (char - 48)
            digits += 1
            if octet > 255:
                return None
        elif char == 46 and digits and octets < 3:
            address = (address << 8) | octet
            octets += 1
            octet = digits = 0
        else:
            return None
    if not digits or octets != 3:
        return None
    return (address << 8) | octet


cdef class CidrSet:
    """IPv4 and IPv6 prefixes in two patricia tries; IPv4-mapped clients match IPv4 entries."""

    cdef readonly object _v4  # readable, so the twin's code can run on this set
    cdef readonly object _v6

    def __init__(self, entries):
        twin = _twin.CidrSet(entries)  # the same parsing, the same error text
        self._v4 = twin._v4
        self._v6 = twin._v6

    def __contains__(self, address):
        """``address`` is a client address as the socket reports it."""
        if type(address) is not str or not PyUnicode_IS_ASCII(address):
            return _twin.CidrSet.__contains__(self, address)  # its code on our tries
        cdef str text = <str> address
        cdef const unsigned char* data = PyUnicode_1BYTE_DATA(text)
        cdef Py_ssize_t length = PyUnicode_GET_LENGTH(text)
        cdef const unsigned char* found
        if memchr(data, 58, length) == NULL:  # no ":": IPv4
            key = _v4_key(data, length)
            return (key if key is not None else text) in self._v4
        found = <const unsigned char*> memchr(data, 37, length)  # "%": a scope, dropped
        if found != NULL:
            length = found - data
            text = PyUnicode_Substring(text, 0, length)
        if (length >= 7 and data[0] == 58 and data[1] == 58 and _LOWER[data[2]] == 102 and _LOWER[data[3]] == 102
                and _LOWER[data[4]] == 102 and _LOWER[data[5]] == 102 and data[6] == 58
                and memchr(data, 46, length) != NULL):  # "::ffff:" and a dot: IPv4-mapped
            key = _v4_key(data + 7, length - 7)
            return (key if key is not None else PyUnicode_Substring(text, 7, length)) in self._v4
        return text in self._v6

    def __len__(self):
        return len(self._v4) + len(self._v6)


# ---------------------------------------------------------------------------------------------
# The RCPT verdict


cdef class RcptMatcher:
    """Design.md §2 "At RCPT TO", rules 1 to 6, in one call per recipient.

    Built once from settings and never mutated: a reload builds a new matcher and swaps it in.
    """

    cdef object _local
    cdef object _relay
    # The same sets when they are this module's DomainSet (not a subclass): then membership is
    # a C call. Anything else (the twin's DomainSet, a plain set) is asked with ``in``.
    cdef DomainSet _local_c
    cdef DomainSet _relay_c
    cdef dict _rewrite
    cdef dict _directories

    def __init__(self, local_domains, relay_domains, rewrite, directories):
        self._local = local_domains
        self._relay = relay_domains
        self._local_c = local_domains if type(local_domains) is DomainSet else None
        self._relay_c = relay_domains if type(relay_domains) is DomainSet else None
        self._rewrite = dict(rewrite)
        self._directories = dict(directories)

    cdef inline bint _is_local(self, object domain) except -1:
        if self._local_c is not None and type(domain) is str:
            return self._local_c._contains(<str> domain)
        return domain in self._local

    def decide(self, arg, grant_value):
        """Decide one ``RCPT`` argument for a session holding ``grant`` (a ``GRANT_*``).

        Raises ParseError for a syntax error (rule 1); every policy outcome is a returned value.
        """
        cdef _Path path = _parse_rcpt(arg)  # first, as in the twin
        cdef int grant = _grant(grant_value)
        cdef object address = path.address
        cdef object domain = path.domain
        cdef int flags = path.flags
        cdef bint may_relay = grant == GRANT_AUTHENTICATED or grant == GRANT_ALLOW_LIST or grant == GRANT_LISTENER
        if flags & ENC_IP_LITERAL and self._is_local(domain):
            flags &= ~ENC_IP_LITERAL
        if flags and not may_relay:
            return _verdict(ACTION_REJECT, RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_ENCAPSULATED,
                            address, domain, path.params)
        if not path.domain:
            if flags:
                raise ParseError(REASON_SYNTAX)  # "user@": no domain to decide on
            # <postmaster> (RFC 5321 §4.5.1) is always ours.
            return _verdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
        if self._rewrite:
            target = self._rewrite.get(domain)
            if target is not None:
                domain = target
                address = path.local() + "@" + domain
        if self._is_local(domain):
            directory = self._directories.get(domain) if self._directories else None
            if directory is None:
                return _verdict(ACTION_FORWARD, RULE_LOCAL, address, domain, path.params)
            if local_key(path.local()) in directory:
                return _verdict(ACTION_FORWARD, RULE_LOCAL_DIRECTORY, address, domain, path.params)
            return _verdict(ACTION_REJECT, RULE_UNKNOWN_USER, address, domain, path.params)
        if (self._relay_c._contains(<str> domain) if self._relay_c is not None and type(domain) is str
                else domain in self._relay):
            return _verdict(ACTION_FORWARD, RULE_RELAY_DOMAIN, address, domain, path.params)
        if grant == GRANT_AUTHENTICATED:
            return _verdict(ACTION_FORWARD, RULE_RELAY_AUTHENTICATED, address, domain, path.params)
        if grant == GRANT_ALLOW_LIST:
            return _verdict(ACTION_FORWARD, RULE_RELAY_ALLOW_LIST, address, domain, path.params)
        if grant == GRANT_LISTENER:
            return _verdict(ACTION_FORWARD, RULE_RELAY_LISTENER, address, domain, path.params)
        return _verdict(ACTION_REJECT, RULE_RELAY_NEVER if grant == GRANT_NEVER else RULE_RELAY_DENIED,
                        address, domain, path.params)


cdef int _grant(object grant) except? -2:
    """A GRANT_* as a C int; -1 for a value equal to none of those that matter (as GRANT_NONE)."""
    cdef long value
    if type(grant) is int:
        try:
            value = grant
        except OverflowError:
            return -1
        return <int> value if GRANT_AUTHENTICATED <= value <= GRANT_NEVER else -1
    # The twin compares with ==, so an IntEnum or a bool decides as the int it equals.
    for value in range(GRANT_AUTHENTICATED, GRANT_NEVER + 1):
        if grant == value:
            return <int> value
    return -1


# Small ints are cached by CPython, so these conversions allocate nothing.
cdef inline object _verdict(int action, int rule, object address, object domain, object params):
    return _tuple5(RcptVerdict, action, rule, address, domain, params)


# ---------------------------------------------------------------------------------------------
# The DATA scanner


cdef class DataScanner:
    """Finds the end of a DATA body as chunks arrive, and what is wrong with it on the way.

    Only ``CRLF . CRLF`` ends the body; see the twin for the reasoning. The state machine is the
    twin's, octet for octet; only the search for line breaks differs (see feed).
    """

    cdef public Py_ssize_t max_line_length
    cdef public Py_ssize_t max_size
    cdef public int violation
    cdef public Py_ssize_t size
    # Public only so that the twin's feed() can run on this scanner for unusual data types.
    cdef public Py_ssize_t _line_length
    cdef public bint _after_cr
    cdef public bint _starts_with_dot

    def __init__(self, Py_ssize_t max_line_length, Py_ssize_t max_size):
        self.max_line_length = max_line_length
        self.max_size = max_size
        self.violation = VIOLATION_NONE
        self.size = 0
        self._line_length = 0
        self._after_cr = False
        self._starts_with_dot = False

    cdef inline void _note(self, int violation) noexcept:
        # Too-big yields to a line-level violation found later, as in the twin: which of the two
        # is seen first would otherwise depend on how TCP cut the body into chunks.
        if self.violation == VIOLATION_NONE or (
                self.violation == VIOLATION_TOO_BIG and violation != VIOLATION_TOO_BIG):
            self.violation = violation

    cdef inline void _grow(self, Py_ssize_t octets) noexcept:
        self._line_length += octets
        if self._line_length + 2 > self.max_line_length:
            self._note(VIOLATION_LINE_TOO_LONG)

    # The twin's method names, for its feed() running on this scanner (see feed).
    def _violate(self, int violation):
        self._note(violation)

    def _grow_line(self, Py_ssize_t octets):
        self._grow(octets)

    def feed(self, data):
        """Scan ``data``; return the index just past the end marker, or -1 if it is not in it."""
        # Both buffers hold a NUL octet after their data, which _feed relies on.
        if type(data) is bytes:
            return self._feed(<const unsigned char*> PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if type(data) is bytearray:
            return self._feed(<const unsigned char*> PyByteArray_AS_STRING(data), PyByteArray_GET_SIZE(data))
        return _twin.DataScanner.feed(self, data)  # its code on our state, for any other type

    cdef Py_ssize_t _feed(self, const unsigned char* buffer, Py_ssize_t length) noexcept:
        cdef Py_ssize_t position = 0, stop
        # The next LF or NUL at or after ``position`` (the twin's nearer of next_newline and
        # next_nul), kept until the scan passes it: searching again from every CR would rescan
        # the rest of the line at each bare CR, quadratic on a run of them. ``buffer`` ends with
        # a NUL octet past ``length`` (see feed), so the search stops at ``length`` at the latest.
        cdef Py_ssize_t newline = -1
        cdef const unsigned char* found
        while position < length:
            if self._after_cr:
                self._after_cr = False
                if buffer[position] == 10:
                    position += 1
                    if self._line_length == 1 and self._starts_with_dot:
                        self.size += position - 3
                        if self.size > self.max_size:
                            self._note(VIOLATION_TOO_BIG)
                        return position
                    self._line_length = 0
                    self._starts_with_dot = False
                    continue
                self._note(VIOLATION_BARE_CR)
                self._grow(1)
            if newline < position:
                newline = _lf_or_nul(buffer + position) - buffer
            found = <const unsigned char*> memchr(buffer + position, 13, newline - position)
            stop = (found - buffer) if found != NULL else newline
            if stop > position:
                if self._line_length == 0 and buffer[position] == 46:
                    self._starts_with_dot = True
                self._grow(stop - position)
            position = stop
            if stop == length:
                break
            position += 1
            if buffer[stop] == 13:
                self._after_cr = True
            else:
                # A bare LF ends no line: the "." after it must not start an end marker. A NUL
                # counts in the line as any other octet, so "\x00." is no end marker either.
                self._note(VIOLATION_BARE_LF if buffer[stop] == 10 else VIOLATION_NUL)
                self._grow(1)
        self.size += length
        if self.size - 3 > self.max_size:  # the twin's size > max_size + 3, without overflow
            self._note(VIOLATION_TOO_BIG)
        return -1
