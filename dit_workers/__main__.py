"""python -m dit_workers --config CONFIG: run one DiT worker on its generation queue."""

from __future__ import annotations

import argparse
import logging
import sys

from dit_workers.config import DitWorkerConfig
from workers.devices import worker_device
from workers.process_log import setup_logging


def main(argv=None, prog: str = "python -m dit_workers") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Run one DiT worker.")
    ap.add_argument("--config", help="DiT worker JSON config (see configs/dit.json); EB_<KEY> variables override "
                                     "its keys")
    ap.add_argument("--redis-url", help="overrides the config's redis_url")
    ap.add_argument("--text-encoder-type", help="overrides the config's text_encoder_type")
    args = ap.parse_args(argv)
    from broker.extras import require

    require("diffusers", "a DiT worker")  # said before anything is loaded or written
    setup_logging("INFO", diffusers=True)
    cfg = DitWorkerConfig.from_json(args.config, redis_url=args.redis_url)
    if args.text_encoder_type:
        from broker.config import normalize_text_encoder_type

        cfg.text_encoder_type = normalize_text_encoder_type(args.text_encoder_type)
    logging.getLogger().setLevel(cfg.log_level)
    if cfg.make_tiny_if_missing:
        from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline

        ensure_tiny_pipeline(cfg.model_path)
    device = worker_device(cfg.device)
    from dit_workers.worker import DitWorker

    DitWorker(cfg, device).run()
    from workers.__main__ import end_process

    end_process(0)


if __name__ == "__main__":
    sys.exit(main())
