"""Exceptions of the shm package: one flat module, messages a user can act on."""


class ShmError(Exception):
    """Base class for shared-memory segment errors."""


class ShmSpaceError(ShmError):
    """Not enough room in /dev/shm (or in the creator's budget) for a new segment."""


class ShmNotFoundError(ShmError):
    """The named segment does not exist: never created, already unlinked by a reader, or swept."""


class ShmExistsError(ShmError):
    """Exclusive creation failed because a segment of that name already exists."""


class ShmUntrustedError(ShmError):
    """A segment a reader was told to read is not one it trusts: another owner, a mode other than 0600, or not the
    size it was told."""
