"""scoremesh: a serving mesh for machine-learning models."""

from functools import cache


@cache
def version() -> str:
    """The installed distribution's version (read on first use: looking it up costs every
    process that imports ``services`` ~25 ms, training runners included)."""
    from importlib import metadata

    try:
        return metadata.version("scoremesh")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0"
