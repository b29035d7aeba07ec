"""What every encoder backend shares: request validation, templating and tokenization."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from broker.errors import InvalidRequest, PromptTooLong
from broker.protocol.schemas import validate_prompts
from workers.checkpoint import CheckpointPaths, TextConfig
from workers.images import ImageLimits, ImagePreprocessor, PreparedImage, per_prompt_images
from workers.template_ids import SplitTemplate, split_template
from workers.templates import Template, template_for

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 1024  # diffusers' tokenizer_max_length: tokens kept after the template prefix


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True, slots=True)
class TokenizedPrompts:
    """Token ids of templated prompts (one job's, from `tokenize`; or the sequences a backend runs together);
    `drop_idx` leading tokens of each are the shared template prefix.

    i2i: `images[i]` are sequence i's images in order, and each image's single `<|image_pad|>` is already
    expanded to its `n_tokens` pads (as Qwen2-VL's processor expands them)."""

    task: str
    ids: list[list[int]]
    drop_idx: int
    images: tuple[tuple[PreparedImage, ...], ...] | None = None

    @property
    def output_lengths(self) -> list[int]:
        return [len(x) - self.drop_idx for x in self.ids]

    @property
    def has_images(self) -> bool:
        return self.images is not None and any(self.images)

    def images_of(self, i: int) -> tuple[PreparedImage, ...]:
        return () if self.images is None else self.images[i]

    @property
    def text_lengths(self) -> list[int]:
        """Output lengths less the image tokens: what max_prompt_tokens bounds."""
        return [n - sum(im.n_tokens for im in self.images_of(i)) for i, n in enumerate(self.output_lengths)]

    def sequence_key(self, i: int) -> tuple:
        """What sequence i's output depends on besides the model and task: its ids and its images' digests."""
        return tuple(self.ids[i]), tuple(im.digest for im in self.images_of(i))


class EncoderBase:
    """Subclasses implement `encode_tokens`; `encode` is the public, validated entry point."""

    backend = "base"
    quantization: str | None = None  # the weights' quantization scheme; None: as loaded, in `dtype`

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
        self.images = ImagePreprocessor(paths.processor, ImageLimits())
        self.images.pin_memory = device.type == "cuda"
        self.vision_images_computed = 0  # images run through the vision tower (counters for the worker's stats)
        self.vision_images_reused = 0  # images whose features came from the cache or a repeat in the batch
        self._check_templates()

    def configure_images(self, limits: ImageLimits | None = None, feature_cache_max_bytes: int | None = None) -> None:
        """The worker's image limits and image-feature cache size (the kernel backend caches features)."""
        if limits is not None:
            self.images.limits = limits

    def _check_templates(self) -> None:
        # A tokenizer that splits the template prefix differently would silently shift every output. Where the
        # template's fixed text can be tokenized once (workers.template_ids), its cut is kept for tokenize.
        self._split_templates: dict[str, SplitTemplate] = {}
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special] if backend else []
        for task in ("t2i", "i2i"):
            t = template_for(task)
            n = len(self.tokenizer(t.prefix, add_special_tokens=False)["input_ids"])
            if n != t.drop_idx:
                raise InvalidRequest(f"tokenizer gives {n} tokens for the {task} template prefix, expected {t.drop_idx}")
            split = split_template(t, specials, self.token_ids)
            if split is not None:
                self._split_templates[task] = split
            else:
                log.info("the %s template is tokenized whole for every prompt (no exact cut at its special tokens "
                         "with this tokenizer)", task)

    def tokenize(self, prompts, task: str = "t2i", raw: bool = False, images=None) -> TokenizedPrompts:
        """Templated token ids. With `raw`, prompts are already full model inputs (as LightLLM's clients send
        them): nothing is added and nothing dropped, and the limit covers the template prefix too.

        images (i2i): one list of encoded images per prompt (a flat list: the same images for every prompt).
        The template gets `Picture {i}: <|vision_start|><|image_pad|><|vision_end|>` per image before the
        prompt; a raw input must hold one `<|image_pad|>` per image itself. max_prompt_tokens counts text
        tokens only: each image adds about 200 tokens (a ~384x384 condition image), bounded by the image limits."""
        prompts = validate_prompts(prompts)
        template: Template = template_for(task)
        per_prompt = per_prompt_images(images, len(prompts))
        n_images = [len(x) for x in per_prompt]
        if task == "t2i" and any(n_images):
            raise InvalidRequest("task 't2i' takes no images; send task='i2i' to encode prompts with images")
        if task == "i2i" and not all(n_images):
            raise InvalidRequest(f"task 'i2i' needs at least one image per prompt; prompt {n_images.index(0)} "
                                 "has none")
        split = self._split_templates.get(task)
        if raw:
            ids = self.token_ids(prompts)
        elif split is not None:
            middles = self.token_ids([split.middle(template.user_part(p, n)) for p, n in zip(prompts, n_images)])
            ids = [split.ids(m) for m in middles]
        else:
            ids = self.token_ids([template.format(p, n) for p, n in zip(prompts, n_images)])
        prepared = None
        if task == "i2i":
            self._check_i2i_available()
            for i, seq in enumerate(ids):
                self._check_image_pads(i, seq, n_images[i], raw)
            prepared = tuple(self.images.prepare_job(per_prompt))
            pad = self.config.image_token_id
            ids = [expand_image_pads(seq, pad, [im.n_tokens for im in imgs]) for seq, imgs in zip(ids, prepared)]
        tokens = TokenizedPrompts(task, ids, 0 if raw else template.drop_idx, prepared)
        limit = self.max_prompt_tokens + (template.drop_idx if raw else 0)
        for i, n in enumerate(tokens.text_lengths):
            if n > limit:
                raise PromptTooLong(
                    f"prompt {i} is {n} text tokens after templating, over the limit of {limit} "
                    "(max_prompt_tokens in the encoder config)"
                )
        if raw and any(len(x) == 0 for x in tokens.ids):
            raise InvalidRequest("a raw input is empty: it must hold at least one token")
        return tokens

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids for each text, no special tokens added. A fast tokenizer's Rust backend is called
        directly: transformers' wrapper around it costs more than the tokenizing (the worker's intake thread
        tokenizes every job, in Python time the compute thread also needs)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return [list(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if len(texts) == 1:  # most jobs: skips handing one text to the batch call's thread pool
            return [backend.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]

    def _check_i2i_available(self) -> None:
        """Raises InvalidRequest when this encoder can't encode images (a backend without a vision tower)."""

    def _check_image_pads(self, i: int, seq: list[int], n_images: int, raw: bool) -> None:
        pad = self.config.image_token_id
        at = [k for k, t in enumerate(seq) if t == pad]
        if len(at) != n_images:
            how = ("a raw input holds one <|vision_start|><|image_pad|><|vision_end|> per image" if raw else
                   "the template adds each image's <|image_pad|>; the prompt text must not hold one")
            raise InvalidRequest(f"prompt {i} holds {len(at)} <|image_pad|> token(s) for {n_images} image(s): {how}")
        if any(b - a == 1 for a, b in zip(at, at[1:])):
            raise InvalidRequest(f"prompt {i}: two <|image_pad|> tokens side by side; separate images with text "
                                 "(e.g. <|vision_end|><|vision_start|>)")

    def encode(self, prompts, task: str = "t2i", images=None) -> list[torch.Tensor]:
        """One [L_i, D] tensor per prompt: last-layer hidden states after the template prefix, no padding.
        i2i: `images` is one list of encoded images (PNG, JPEG, WebP, BMP bytes) per prompt, or one flat list
        for the same images in every prompt; each prompt's output includes its image tokens' states."""
        return self.encode_tokens(self.tokenize(prompts, task, images=images))

    @torch.inference_mode()
    def encode_tokens(self, batch: TokenizedPrompts) -> list[torch.Tensor]:
        raise NotImplementedError


def expand_image_pads(seq: list[int], pad: int, counts: list[int]) -> list[int]:
    """Each `pad` token in `seq` -> counts[k] copies, in order (the processor's placeholder expansion)."""
    out: list[int] = []
    k = 0
    for t in seq:
        if t == pad:
            out.extend([pad] * counts[k])
            k += 1
        else:
            out.append(t)
    assert k == len(counts), "image pad count checked before expansion"
    return out
