"""What every encoder backend shares: request validation, templating and tokenization."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from broker.errors import InvalidRequest, PromptTooLong
from workers.checkpoint import CheckpointPaths, TextConfig
from workers.templates import Template, template_for

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1024  # diffusers' tokenizer_max_length: tokens kept after the template prefix


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def validate_prompts(prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise InvalidRequest(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InvalidRequest("prompts is empty: send at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InvalidRequest(f"prompt {i} is a {type(p).__name__}, not a string")
    return list(prompts)


@dataclass(frozen=True, slots=True)
class TokenizedBatch:
    """Token ids of templated prompts; `drop_idx` leading tokens of each are the shared template prefix."""

    task: str
    ids: list[list[int]]
    drop_idx: int

    @property
    def output_lengths(self) -> list[int]:
        return [len(x) - self.drop_idx for x in self.ids]


class EncoderBase:
    """Subclasses implement `encode_tokens`; `encode` is the public, validated entry point."""

    backend = "base"

    def __init__(self, paths: CheckpointPaths, config: TextConfig, tokenizer, device: torch.device,
                 dtype: torch.dtype, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS):
        self.paths = paths
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.max_prompt_tokens = max_prompt_tokens
        self.hidden_size = config.hidden_size
        self.model_id = paths.root
        self._check_templates()

    def _check_templates(self) -> None:
        # A tokenizer that splits the template prefix differently would silently shift every output.
        for task in ("t2i", "i2i"):
            t = template_for(task)
            n = len(self.tokenizer(t.prefix, add_special_tokens=False)["input_ids"])
            if n != t.drop_idx:
                raise InvalidRequest(f"tokenizer gives {n} tokens for the {task} template prefix, expected {t.drop_idx}")

    def tokenize(self, prompts, task: str = "t2i", raw: bool = False) -> TokenizedBatch:
        """Templated token ids. With `raw`, prompts are already full model inputs (as LightLLM's clients send
        them): nothing is added and nothing dropped, and the limit covers the template prefix too."""
        prompts = validate_prompts(prompts)
        template: Template = template_for(task)
        if task != "t2i":
            raise InvalidRequest(f"task {task!r} needs images; this encoder path takes text only")
        texts = prompts if raw else [template.format(p) for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        batch = TokenizedBatch(task=task, ids=[list(x) for x in ids], drop_idx=0 if raw else template.drop_idx)
        limit = self.max_prompt_tokens + (template.drop_idx if raw else 0)
        for i, n in enumerate(batch.output_lengths):
            if n > limit:
                raise PromptTooLong(
                    f"prompt {i} is {n} tokens after templating, over the limit of {limit} "
                    "(max_prompt_tokens in the encoder config)"
                )
        if raw and any(len(x) == 0 for x in batch.ids):
            raise InvalidRequest("a raw input is empty: it must hold at least one token")
        return batch

    def encode(self, prompts, task: str = "t2i") -> list[torch.Tensor]:
        """One [L_i, D] tensor per prompt: last-layer hidden states after the template prefix, no padding."""
        return self.encode_tokens(self.tokenize(prompts, task))

    @torch.inference_mode()
    def encode_tokens(self, batch: TokenizedBatch) -> list[torch.Tensor]:
        raise NotImplementedError
