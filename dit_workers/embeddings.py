"""Where a DiT worker's prompt embeddings come from, by `text_encoder_type`: in process or the broker."""

from __future__ import annotations

import logging

import torch

from dit_workers.config import DitWorkerConfig

log = logging.getLogger("dit_workers")


class ServiceEmbedder:
    """`service`: the shared encoder behind Redis. This process loads no encoder weights."""

    mode = "service"

    def __init__(self, cfg: DitWorkerConfig):
        from broker.client import EncoderClient

        cc = cfg.encoder_client
        self.client = EncoderClient(cc.redis_url, queue=cc.queue, timeout=cc.timeout, retries=cc.retries,
                                    transport=cc.transport)

    def embed(self, prompts: list[str], task: str, images: list[bytes]) -> list[torch.Tensor]:
        return self.client.encode(prompts, task=task, images=images or None)


class InProcessEmbedder:
    """`baseline` / `kernel`: the encoder loaded in this process, as the seed guide's first two modes do."""

    def __init__(self, cfg: DitWorkerConfig, device: str):
        from workers.encoders import load_encoder

        self.mode = cfg.text_encoder_type
        self.encoder = load_encoder(cfg.model_path, backend=cfg.text_encoder_type, device=device)

    def embed(self, prompts: list[str], task: str, images: list[bytes]) -> list[torch.Tensor]:
        if images:
            return self.encoder.encode(prompts, task=task, images=images)
        return self.encoder.encode(prompts, task=task)


def make_embedder(cfg: DitWorkerConfig, device: str):
    if cfg.text_encoder_type == "service":
        return ServiceEmbedder(cfg)
    return InProcessEmbedder(cfg, device)
