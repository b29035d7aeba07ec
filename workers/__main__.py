"""python -m workers --config CONFIG [--redis-url URL]: run one encoder worker (model loaded once, no fork)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from workers.config import EncoderWorkerConfig
from workers.devices import worker_device
from workers.process_log import setup_logging

# The worker's intake, compute and delivery threads hand work to each other many times a batch. A thread woken
# while another runs Python waits for the GIL up to the switch interval (CPython's default: 5 ms, a whole
# forward on the GPU); 0.25 ms bounds that wait at a small cost in forced switches.
GIL_SWITCH_INTERVAL_S = 0.00025


def pick_backend(name: str, device: str) -> str:
    if name == "auto":
        return "kernel" if device.startswith("cuda") else "baseline"
    return name


def load_configured_encoder(cfg: EncoderWorkerConfig):
    from workers.encoders import load_encoder
    from workers.make_tiny import ensure_tiny

    if cfg.make_tiny_if_missing:
        ensure_tiny(cfg.model_dir)
    device = worker_device(cfg.device)
    if device.startswith("cuda"):
        # On a GPU the process's CPU tensor work is bookkeeping (splits, small copies): torch's intra-op pool
        # would only spin threads that the intake and delivery threads and the clients on this host need.
        torch.set_num_threads(1)
    backend = "kernel" if cfg.backend == "auto" and cfg.quantization else pick_backend(cfg.backend, device)
    return load_encoder(cfg.model_dir, backend=backend, device=device, dtype=cfg.dtype,
                        max_prompt_tokens=cfg.max_prompt_tokens, quantization=cfg.quantization)


def end_process(code: int = 0) -> None:
    """Ends the process now that the worker has stopped: its records are out of Redis and its logs flushed.
    Interpreter finalization (torch's and transformers' modules and the model torn down) would take seconds
    more, past the grace honcho or systemd give before SIGKILL."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None, prog: str = "python -m workers") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split(":")[1].strip())
    ap.add_argument("--config", help="encoder worker JSON config (see configs/encoder.json); EB_<KEY> variables "
                                     "override its keys; without one, the defaults and the variables")
    ap.add_argument("--redis-url", help="overrides the config's redis_url")
    ap.add_argument("--queue", help="overrides the config's queue")
    ap.add_argument("--backend", choices=["auto", "baseline", "kernel"], help="overrides the config's backend")
    args = ap.parse_args(argv)
    setup_logging("INFO")
    cfg = EncoderWorkerConfig.from_json(args.config, redis_url=args.redis_url, queue=args.queue,
                                        backend=args.backend)
    logging.getLogger().setLevel(cfg.log_level)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    from broker.errors import ModelLoadError
    from workers.metrics import start_metrics
    from workers.worker import EncoderWorker

    try:
        encoder = load_configured_encoder(cfg)
    except ModelLoadError as e:  # a wrong path or a folder we may not touch: one line, no traceback
        logging.getLogger("workers").error("%s", e)
        return 2
    worker = EncoderWorker(cfg, encoder)
    start_metrics(cfg.metrics_port, worker.tally, worker.connection, cfg.queue, worker.name, worker.writer,
                  worker.links.pixels)
    worker.run()
    end_process(0)


if __name__ == "__main__":
    sys.exit(main())
