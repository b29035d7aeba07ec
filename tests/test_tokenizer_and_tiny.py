"""The embedded tiny checkpoint and its tokenizer: real Qwen2 ids, the template prefix lengths, HF loads it."""

import json
import os

import torch

from workers.make_tiny import tiny_state_dict
from workers.templates import I2I, T2I
from workers.tiny_tokenizer import SPECIAL_TOKENS


def test_special_tokens_at_qwen_ids(baseline):
    tok = baseline.tokenizer
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655, "<|video_pad|>": 151656,
    }
    for token, tid in expected.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(151643, 151657))


def test_template_prefixes_have_qwen_image_drop_idx(baseline):
    tok = baseline.tokenizer
    assert tok("<|im_start|>system\n", add_special_tokens=False)["input_ids"] == [151644, 8948, 198]
    assert len(tok(T2I.prefix, add_special_tokens=False)["input_ids"]) == 34 == T2I.drop_idx
    assert len(tok(I2I.prefix, add_special_tokens=False)["input_ids"]) == 64 == I2I.drop_idx


def test_tokenizer_round_trips_unicode(baseline):
    tok = baseline.tokenizer
    text = "ünïcödé 🦊 日本語のテキスト  tabs\tand\nnewlines 1234567"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert max(ids) < 151643  # regular text never produces special ids


def test_encoder_token_ids_equal_the_tokenizers(baseline):
    """The encoder calls the fast tokenizer's backend directly: the ids must be what transformers' call gives,
    special tokens inside the text, NFC normalization and odd whitespace included."""
    texts = [T2I.format("a red fox in snow", 0), "<|im_start|>user\n<|image_pad|><|image_pad|>x<|im_end|>", "",
             "e\u0301 (decomposed) vs \u00e9", "  leading and trailing  ", "1234567890" * 7, "🦊" * 5 + "\r\n\t"]
    want = [list(x) for x in baseline.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert baseline.token_ids(texts) == want
    assert [baseline.token_ids([t])[0] for t in texts] == want  # one text alone takes another call


def test_tiny_weights_are_deterministic():
    a, b = tiny_state_dict(), tiny_state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_layout_matches_qwen_image(tiny_dir):
    for sub in ("text_encoder", "tokenizer", "processor"):
        assert os.path.isdir(os.path.join(tiny_dir, sub)), sub
    with open(os.path.join(tiny_dir, "text_encoder", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert sum(cfg["rope_scaling"]["mrope_section"]) * 2 == head_dim
    with open(os.path.join(tiny_dir, "text_encoder", "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert any(k.startswith("model.layers.") for k in index["weight_map"])  # Qwen's own key names
    assert any(k.startswith("visual.") for k in index["weight_map"])


def test_hf_loads_tiny_without_missing_keys(tiny_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(tiny_dir, "text_encoder"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
