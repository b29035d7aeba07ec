"""The log of a worker process (encoder or DiT): our own lines, in one format, that a user reads in one screen at
start. The libraries' load-time progress bars (transformers' "Loading weights", diffusers' "Loading pipeline
components") are turned off: a worker loads once and logs what it loaded, and in a log file a bar is noise."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: str = "INFO", diffusers: bool = False) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
