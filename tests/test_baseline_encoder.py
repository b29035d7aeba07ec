"""The baseline backend is diffusers' QwenImagePipeline text encoding, to the number."""

import pytest
import torch

from broker.errors import InvalidRequest, PromptTooLong


def diffusers_style(encoder, prompts):
    """What QwenImagePipeline._get_qwen_prompt_embeds computes, written out independently."""
    from workers.templates import T2I

    tok, model = encoder.tokenizer, encoder.model
    txt = [T2I.text.format(p) for p in prompts]
    enc = tok(txt, max_length=1024 + 34, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True)
    hs = out.hidden_states[-1]
    mask = enc.attention_mask.bool()
    split = torch.split(hs[mask], mask.sum(dim=1).tolist(), dim=0)
    return [e[34:] for e in split]


def test_baseline_equals_diffusers_encode(baseline):
    prompts = ["a red fox in snow", "", "🦊 ünïcödé " * 3, "A " + "very " * 40 + "long prompt"]
    got = baseline.encode(prompts)
    want = diffusers_style(baseline, prompts)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_output_length_is_user_tokens_plus_suffix(baseline):
    (out,) = baseline.encode(["a red fox"])
    n_user = len(baseline.tokenizer("a red fox", add_special_tokens=False)["input_ids"])
    assert out.shape == (n_user + 5, baseline.hidden_size)  # <|im_end|>\n<|im_start|>assistant\n


@pytest.mark.parametrize("prompts, task, error, message", [
    ("just a string", "t2i", InvalidRequest, "list of strings"),
    ([], "t2i", InvalidRequest, "empty"),
    (["ok", 3], "t2i", InvalidRequest, "prompt 1 is a int"),
    (["x"], "video", InvalidRequest, "unknown task"),
    (["fox " * 200], "t2i", PromptTooLong, "over the limit of 96"),
])
def test_bad_requests_are_refused_clearly(baseline, prompts, task, error, message):
    with pytest.raises(error, match=message):
        baseline.encode(prompts, task=task)
