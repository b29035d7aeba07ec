"""The `encoder-broker` command (encoder_broker.cli) and the configs shipped with the package (`configs/`)."""
