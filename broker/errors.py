"""Every error the broker, its workers and its clients raise, with messages a user can act on."""

from __future__ import annotations


class BrokerError(Exception):
    """Base class of every encoder-broker error."""


class InvalidRequest(BrokerError, ValueError):
    """The request can never succeed as sent (bad prompt type, unknown task, too long, bad image)."""


class PromptTooLong(InvalidRequest):
    pass


class EncodeFailed(BrokerError):
    """The worker ran the job and it failed; the message carries the worker's reason."""


class Overloaded(BrokerError):
    """The queue is past its bound; retry later or add encoder workers."""


class BrokerTimeout(BrokerError, TimeoutError):
    """No result within the client's timeout."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """Redis could not be reached."""


class RedisRefused(BrokerError):
    """Redis answered with an error: out of memory, a read-only replica, a missing permission, a failing disk...;
    the message says what to change."""


class ResultLost(BrokerError):
    """A result handle points at data that is gone (segment swept or blob expired before it was read), or at
    something that is not this job's result (a segment name of another prefix, another key): nothing is read."""


class ModelLoadError(BrokerError):
    """A checkpoint directory is missing, incomplete or not a Qwen2.5-VL text encoder."""


class ProtocolError(BrokerError):
    """A message on the wire is not what this version of encoder-broker speaks."""


class MissingExtra(BrokerError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it (broker.ops.extras)."""
