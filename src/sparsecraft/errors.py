"""Error types whose message is one line for the user; the CLI prints it and exits non-zero."""


class SparsecraftError(Exception):
    """Base of every error sparsecraft raises on purpose for bad input or config."""


class ConfigError(SparsecraftError, ValueError):
    """A setting is invalid."""


class CraftError(SparsecraftError, ValueError):
    """The model cannot be crafted as asked."""


class CheckpointError(SparsecraftError, OSError):
    """A path, file or checkpoint cannot be read or written as asked."""
