"""python -m dit_workers --config CONFIG: run one DiT worker on its generation queue."""

from __future__ import annotations

import argparse
import logging
import sys

from dit_workers.config import DitWorkerConfig
from workers.devices import worker_device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_workers", description="Run one DiT worker.")
    ap.add_argument("--config", help="DiT worker JSON config (see configs/dit.json); EB_<KEY> variables override "
                                     "its keys")
    ap.add_argument("--redis-url", help="overrides the config's redis_url")
    ap.add_argument("--text-encoder-type", help="overrides the config's text_encoder_type")
    args = ap.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = DitWorkerConfig.from_json(args.config, redis_url=args.redis_url)
    if args.text_encoder_type:
        from broker.config import normalize_text_encoder_type

        cfg.text_encoder_type = normalize_text_encoder_type(args.text_encoder_type)
    logging.getLogger().setLevel(cfg.log_level)
    if cfg.make_tiny_if_missing:
        from broker.errors import ModelLoadError
        from dit_workers.make_tiny_pipeline import ensure_tiny_pipeline

        try:
            ensure_tiny_pipeline(cfg.model_path)
        except ModelLoadError as e:  # a folder we may not touch: one line, no traceback
            logging.getLogger("dit_workers").error("%s", e)
            return 2
    device = worker_device(cfg.device)
    from dit_workers.worker import DitWorker

    DitWorker(cfg, device).run()
    from workers.__main__ import end_process

    end_process(0)


if __name__ == "__main__":
    sys.exit(main())
