"""The reference backend: HF transformers' Qwen2.5-VL, called as diffusers' QwenImagePipeline (t2i) and
QwenImageEditPlusPipeline (i2i) call it.

i2i: the model gets input_ids, attention_mask, pixel_values and image_grid_thw as the Edit pipeline passes them
from its Qwen2VLProcessor, plus the processor's `mm_token_type_ids` (image tokens 1, text 0). transformers >= 5.15
builds the 3-D M-RoPE positions from that field only; diffusers 0.42's pipeline does not forward it, so there the
model silently falls back to 1-D text positions for image tokens (diffusers issue #14194, fix in PR #14189). The
positions the model was trained with are the 3-D ones, which is what this backend (and the kernel's) computes.
"""

from __future__ import annotations

import inspect

import torch

from workers.encoders.base import EncoderBase, TokenizedPrompts


class BaselineEncoder(EncoderBase):
    backend = "baseline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from transformers import Qwen2_5_VLForConditionalGeneration

        from workers.checkpoint import transformers_config

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.paths.text_encoder, config=transformers_config(self.paths.text_encoder), dtype=self.dtype
        ).to(self.device).eval()

    @property
    def _takes_token_types(self) -> bool:
        return "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters

    @torch.inference_mode()
    def encode_tokens(self, batch: TokenizedPrompts) -> list[torch.Tensor]:
        # diffusers: right-padded batch, output_hidden_states, hidden_states[-1], masked split, drop the prefix.
        longest = max(len(x) for x in batch.ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch.ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch.ids), longest), dtype=torch.long)
        for i, ids in enumerate(batch.ids):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        extra = {}
        if batch.has_images:
            # the processor's outputs for these images: every occurrence in order (the vision tower runs on each)
            images = [im for i in range(len(batch.ids)) for im in batch.images_of(i)]
            spec = self.images.spec  # the processor's pixels, computed on the device (workers.model.image_patches)
            extra = dict(pixel_values=torch.cat([im.pixel_values(spec, self.device) for im in images]),
                         image_grid_thw=torch.tensor([im.grid_thw for im in images], device=self.device))
            if self._takes_token_types:  # transformers < 5.15 finds image tokens in input_ids itself
                extra["mm_token_type_ids"] = (input_ids == self.config.image_token_id).int().to(self.device)
            self.vision_images_computed += len(images)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1]
        bool_mask = mask.bool()
        split = torch.split(hidden[bool_mask], bool_mask.sum(dim=1).tolist(), dim=0)
        return [e[batch.drop_idx:] for e in split]
