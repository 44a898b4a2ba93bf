"""How texts are normalised before anything measures or learns from them: the training data (preprocess) and the
texts the drift monitor compares with it go through the same `clean_text`. Standard library only."""

from __future__ import annotations

import html
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Normalise without changing meaning: HTML entities (also double-escaped ones such as `&amp;#039;`),
    Unicode NFKC, and runs of whitespace collapsed to one space."""
    for _ in range(2):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = unicodedata.normalize("NFKC", text)
    return _WHITESPACE.sub(" ", text).strip()
