"""The SMTP reply value (code, RFC 3463 enhanced status code, text), shared by every layer.

It lives outside the SMTP core so that configuration can parse and validate operator-supplied
replies without importing the core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_REPLY_TEXT = re.compile(r"^([245]\d\d) ([245])\.(\d{1,3})\.(\d{1,3})(?: (.*))?$")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "5.7.1"; empty only for the greeting-style replies that carry none
    text: str
    _wire: bytes = field(init=False, repr=False, compare=False)  # encoded once, sent many times

    def __post_init__(self) -> None:
        object.__setattr__(self, "_wire", (str(self) + "\r\n").encode("ascii"))

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
        return self._wire

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
