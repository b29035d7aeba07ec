"""The reference backend: HF transformers' Qwen2.5-VL, called exactly as diffusers' QwenImagePipeline calls it."""

from __future__ import annotations

import torch

from workers.encoders.base import EncoderBase, TokenizedBatch


class BaselineEncoder(EncoderBase):
    backend = "baseline"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.paths.text_encoder, dtype=self.dtype
        ).to(self.device).eval()

    @torch.inference_mode()
    def encode_tokens(self, batch: TokenizedBatch) -> list[torch.Tensor]:
        # diffusers: right-padded batch, output_hidden_states, hidden_states[-1], masked split, drop the prefix.
        longest = max(len(x) for x in batch.ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch.ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch.ids), longest), dtype=torch.long)
        for i, ids in enumerate(batch.ids):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        bool_mask = mask.bool()
        split = torch.split(hidden[bool_mask], bool_mask.sum(dim=1).tolist(), dim=0)
        return [e[batch.drop_idx:] for e in split]
