"""The package's version: pyproject.toml reads it from here, so this is its one source."""

__version__ = "0.1.0"
