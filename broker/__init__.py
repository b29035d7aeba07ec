"""encoder-broker's client API: `from broker import EncoderClient` (and GenerationClient, the errors).

The clients are imported on first use, so `python -m broker stats` does not load torch."""

from broker.errors import (BrokerError, BrokerTimeout, BrokerUnavailable, EncodeFailed, InvalidRequest, Overloaded,
                           RedisRefused, ResultLost)

__all__ = ["BrokerError", "BrokerTimeout", "BrokerUnavailable", "EncodeFailed", "EncoderClient", "GenerationClient",
           "InvalidRequest", "Overloaded", "RedisRefused", "ResultLost"]


def __getattr__(name: str):
    if name == "EncoderClient":
        from broker.client import EncoderClient

        return EncoderClient
    if name == "GenerationClient":
        from broker.generation import GenerationClient

        return GenerationClient
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
