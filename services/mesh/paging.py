"""The one rule for ``page_size`` in every List call (AIP-158): 0 means the default, more
than the maximum is capped, a negative one is an error."""

from __future__ import annotations

from services.mesh.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument.for_field("page_size", "must not be negative")
    return min(requested or default, maximum)
