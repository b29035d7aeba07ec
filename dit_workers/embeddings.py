"""Where a DiT worker's prompt embeddings come from, by `text_encoder_type`: in process or the broker.

Every embedder's `embed(prompts, task, images)` returns one [L_i, D] tensor per prompt, cut at the template's
drop_idx, unpadded: what diffusers' `_get_qwen_prompt_embeds` computes before it pads.
"""

from __future__ import annotations

import inspect
import io
import logging

import torch

from broker.errors import BrokerError, InvalidRequest
from dit_workers.config import DitWorkerConfig

log = logging.getLogger("dit_workers")


class ServiceEmbedder:
    """`service`: the shared encoder behind Redis. This process loads no encoder weights."""

    mode = "service"

    def __init__(self, cfg: DitWorkerConfig):
        from broker.client import EncoderClient

        cc = cfg.encoder_client
        self.client = EncoderClient(cc.redis_url, queue=cc.queue, timeout=cc.timeout, retries=cc.retries,
                                    transport=cc.transport, shm_prefix=cc.shm_prefix)

    def embed(self, prompts: list[str], task: str, images: list[bytes]) -> list[torch.Tensor]:
        # one job: the prompt and its negative, each with the same condition images (features computed once)
        return self.client.encode(prompts, task=task, images=per_prompt(prompts, images))


class InProcessEmbedder:
    """`baseline` / `kernel`: the encoder loaded in this process, as the seed guide's first two modes do."""

    def __init__(self, cfg: DitWorkerConfig, device: str):
        from workers.encoders import load_encoder

        self.mode = cfg.text_encoder_type
        self.encoder = load_encoder(cfg.model_path, backend=cfg.text_encoder_type, device=device, dtype=cfg.dtype,
                                    quantization=cfg.quantization)

    def embed(self, prompts: list[str], task: str, images: list[bytes]) -> list[torch.Tensor]:
        if not images:
            return self.encoder.encode(prompts, task=task)
        if "images" not in inspect.signature(self.encoder.encode).parameters:
            raise InvalidRequest(f"the {self.mode} encoder backend encodes text only (its encode() takes no images): "
                                 "i2i needs the vision path of workers.encoders")
        return self.encoder.encode(prompts, task=task, images=per_prompt(prompts, images))


def per_prompt(prompts: list[str], images: list[bytes]) -> list[list[bytes]] | None:
    """The condition images (encoded) as the encoders take them: the same list for every prompt, None for t2i."""
    return [list(images) for _ in prompts] if images else None


def make_embedder(cfg: DitWorkerConfig, device: str):
    if cfg.text_encoder_type == "service":
        from dit_workers.lightllm_http import LightLLMHttpEmbedder, is_http_url

        cc = cfg.encoder_client
        if is_http_url(cc.redis_url):  # LightX2V's meaning: a LightLLM server (or our HTTP front)
            return LightLLMHttpEmbedder(cc.redis_url, cc.timeout, cc.retries, cc.transport == "shm")
        return ServiceEmbedder(cfg)
    return InProcessEmbedder(cfg, device)


def probe_png(size: tuple[int, int] = (64, 64)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (180, 90, 40)).save(buf, format="PNG")
    return buf.getvalue()


def image_support(embedder) -> str | None:
    """None when `embedder` encodes i2i prompts with images; otherwise why it can't (its own error). Asks the
    backend (or the broker) with one small image rather than assuming."""
    try:
        out = embedder.embed(["probe"], "i2i", [probe_png()])
    except (BrokerError, TypeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    if len(out) != 1 or out[0].dim() != 2:
        return f"an i2i probe came back as {[tuple(t.shape) for t in out]}, not one [L, D] tensor"
    return None
