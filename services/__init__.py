"""scoremesh: a serving mesh for machine-learning models."""

from importlib import metadata

try:
    __version__ = metadata.version("scoremesh")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0.0.0"
