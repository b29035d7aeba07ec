"""An encoder worker whose forward costs a set time, spent holding the GIL, spent waiting, or both: the broker's
overhead under a GPU-like forward, measured on a machine without a GPU.

    python benchmarks/standin_worker.py --config CONFIG --gil-ms 4 --wait-ms 2

A forward on the GPU keeps the calling thread busy in Python (kernel launches, metadata) for part of its time and
waits for the device for the rest; the first holds the GIL that the worker's intake and delivery threads need.
Each batch here gives zero states of the right shapes (the tokenizer and everything around the forward are
real), after busy-looping `--gil-ms` and sleeping `--wait-ms`, both per batch plus `--per-seq-ms` per sequence.
benchmarks/load.py starts it with `--standin GIL_MS,WAIT_MS,SEQ_MS`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def hold_gil(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:  # pure bytecode: keeps the GIL except at the interpreter's switch points
        pass


def slow_down(encoder, gil_ms: float, wait_ms: float, per_seq_ms: float) -> None:
    """Replaces the encoder's forward with the stand-in: states of the right shape (zeros), at a GPU-like cost."""
    import torch

    def encode_tokens(batch):
        out = [torch.zeros(len(ids) - batch.drop_idx, encoder.hidden_size, dtype=encoder.dtype) for ids in batch.ids]
        extra = per_seq_ms * len(batch.ids)
        hold_gil(gil_ms + extra / 2)
        time.sleep((wait_ms + extra / 2) / 1e3)
        return out

    encoder.encode_tokens = encode_tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gil-ms", type=float, default=4.0)
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--per-seq-ms", type=float, default=0.05)
    args = ap.parse_args(argv)
    from workers.__main__ import GIL_SWITCH_INTERVAL_S, load_configured_encoder
    from workers.config import EncoderWorkerConfig
    from workers.worker import EncoderWorker

    cfg = EncoderWorkerConfig.from_json(args.config)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    encoder = load_configured_encoder(cfg)
    slow_down(encoder, args.gil_ms, args.wait_ms, args.per_seq_ms)
    EncoderWorker(cfg, encoder).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
