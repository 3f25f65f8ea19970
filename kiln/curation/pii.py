"""PII redaction with typed placeholders: emails, IPv4/IPv6 addresses, phone numbers and
credit-card numbers (a digit run is a card only when its Luhn checksum holds)."""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|\b(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}\b)?")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# not inside a longer run of digit groups (a card number that failed its Luhn check stays text)
PHONE = re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
                   r"\b(?![ .-]?\d)")


def luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact(text: str, counts: Counter) -> str:
    def sub(pattern, label, check=None):
        def replace(match):
            if check and not check(match.group(0)):
                return match.group(0)
            counts[label] += 1
            return f"<{label}>"

        return lambda t: pattern.sub(replace, t)

    # order matters: cards before phones (a card is also a long digit run), emails first
    for step in (sub(EMAIL, "EMAIL"), sub(CARD, "CREDIT_CARD", lambda s: luhn(re.sub(r"\D", "", s))),
                 sub(IPV4, "IP_ADDRESS"), sub(IPV6, "IP_ADDRESS"), sub(PHONE, "PHONE")):
        text = step(text)
    return text
