"""Typed errors of the kvbm library.

Every error carries one clear message: what is wrong and how to fix it. The CLI maps them to one line on
stderr and an exit code; the engine integration turns storage errors into "no offload" plus a warning.
"""


class KvbmError(Exception):
    """Base class of every error kvbm raises on purpose."""


class ConfigError(KvbmError):
    """A DYN_KVBM_* variable or option has a value kvbm cannot use (exit code 2 at the CLI)."""


class StorageError(KvbmError):
    """A tier's backing storage cannot be created or used (directory, file, memory)."""


class TransferError(KvbmError):
    """A block could not be moved between tiers (the block is dropped, never served)."""


class CorruptBlockError(TransferError):
    """A block read back from disk failed its checksum or identity check."""
