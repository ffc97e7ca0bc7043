"""The one exception hierarchy of ferrytune.

Entry points catch :class:`FerrytuneError` and print its message as one line
(no traceback unless ``--debug``); anything else is a bug and shows a traceback.
"""


class FerrytuneError(Exception):
    """Base class of every error ferrytune raises on purpose."""


class ConfigError(FerrytuneError, ValueError):
    """A config key is unknown, missing or out of range. The message names the key."""


class DataError(FerrytuneError, ValueError):
    """A dataset file is missing or malformed. The message names the file and line."""


class CheckpointError(FerrytuneError):
    """A model or training checkpoint is missing, truncated or inconsistent."""


class PlanError(FerrytuneError):
    """The memory budgets cannot hold the working set. The message names the budget."""


class StoreError(FerrytuneError):
    """The NVMe block store failed (disk full, short IO, bad directory)."""


class CorruptRecordError(StoreError):
    """A block record read back from the store does not match its checksum."""


class DistributedError(FerrytuneError):
    """Ranks disagree or a rank failed."""
