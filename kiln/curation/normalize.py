"""Text normalization: mojibake repair (ftfy), Unicode NFKC, control and zero-width characters
removed, whitespace runs collapsed (newlines kept, so line-based signals survive)."""

from __future__ import annotations

import re
import unicodedata

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    if not text.isascii():  # ASCII text has no mojibake to repair, and ftfy is most of the cost
        import ftfy

        text = ftfy.fix_text(text, normalization="NFKC")
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()
