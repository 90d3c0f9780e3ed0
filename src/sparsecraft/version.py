"""The package version, in one place (the CLI and the package face read it)."""

__version__ = "0.1.0"
