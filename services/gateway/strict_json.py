"""JSON parsing that refuses what ``json.loads`` silently accepts: a key given twice."""

from __future__ import annotations

from typing import Any


class DuplicateKey(ValueError):
    """A JSON object names ``key`` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook`` for ``json.loads``: a repeated key means two values, and
    ``json.loads`` would keep the last one without a word."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKey(key)
        document[key] = value
    return document
