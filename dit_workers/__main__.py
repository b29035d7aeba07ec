"""python -m dit_workers --config CONFIG: run one DiT worker on its generation queue. CONFIG may be LightX2V's
Qwen-Image config as it is (its keys mean what they mean there); `--model-path` stands for LightX2V's."""

from __future__ import annotations

import argparse
import logging
import sys

from dit_workers.config import DitWorkerConfig
from workers.devices import worker_device
from workers.process_log import setup_logging


def main(argv=None, prog: str = "python -m dit_workers") -> int:
    ap = argparse.ArgumentParser(prog=prog, description="Run one DiT worker.")
    ap.add_argument("--config", help="DiT worker JSON config (see configs/dit.json), or a LightX2V Qwen-Image one; "
                                     "EB_<KEY> variables override its keys")
    ap.add_argument("--model-path", help="overrides the config's model_path (a Qwen-Image directory)")
    ap.add_argument("--redis-url", help="overrides the config's redis_url")
    ap.add_argument("--text-encoder-type", help="overrides the config's text_encoder_type")
    args = ap.parse_args(argv)
    from broker.ops.extras import require

    require("diffusers", "a DiT worker")  # said before anything is loaded or written
    setup_logging("INFO", diffusers=True)
    try:
        cfg = DitWorkerConfig.from_json(args.config, redis_url=args.redis_url, model_path=args.model_path,
                                        text_encoder_type=args.text_encoder_type)
    except ValueError as e:  # a config this worker can't run as it says: why, without a traceback
        sys.exit(f"{prog}: {args.config or 'config'}: {e}")
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
