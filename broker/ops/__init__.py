"""Operators' tools: `encoder-broker stats`, the project's Redis and its credential, and which optional extras are
installed."""
