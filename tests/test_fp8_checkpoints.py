"""Pre-quantized checkpoints as people have them, written from the tiny checkpoint by quantizing its decoder's linear
weights in the test: ComfyUI's single-file "scaled fp8" text encoder (per-tensor `scale_weight`, the `scaled_fp8`
marker, `model.layers.*` names) and the compressed-tensors / vLLM layout (`weight_scale` per channel [N, 1] or per
tensor, `input_scale`, config.json's quantization_config, `model.language_model.*` names). With quantization
"fp8" their e4m3 weights load as stored, each fused part keeping its scale; without, they load dequantized."""

import json
import os
import re
import shutil

import pytest
import torch

from broker.errors import ModelLoadError
from tests.fp8_emulation import emulated_encoder
from tests.test_fp8_encoder import EMULATION_TOL, PROMPTS
from tests.test_kernel_encoder import _new_style, copy_without_weights, rel_l2
from workers.checkpoint import read_text_config, resolve_checkpoint
from workers.encoders import load_encoder
from workers.model import qwen2_5_vl_vision as vision
from workers.model.qwen2_5_vl_text import ModelArgs, load_state_dict

E4M3 = torch.float8_e4m3fn
DECODER_LINEAR = re.compile(r"^model\.(layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))\.weight$")
VISION_MLP = re.compile(r"^(visual\.blocks\.\d+\.mlp\.(gate|up|down)_proj)\.weight$")
CPU = torch.device("cpu")
LAYOUTS = ["comfyui", "compressed-tensors-channel", "compressed-tensors-tensor"]
COMPRESSED_TENSORS_CONFIG = {  # as llm-compressor writes an FP8 "dynamic" scheme
    "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:visual.*"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True}}}}


def quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 data, scale) with w ~ data * scale: scale [N, 1] per output channel, or a 0-d scalar per tensor."""
    amax = w.float().abs().amax(dim=1, keepdim=True) if per_channel else w.float().abs().max()
    scale = amax / 448.0
    return (w.float() / scale).clamp(-448, 448).to(E4M3), scale


def write_layout(src: str, dst: str, layout: str) -> dict[str, torch.Tensor]:
    """The tiny checkpoint at `src` rewritten to `dst` in `layout`; returns the decoder's dequantized linear weights
    ('layers.0.self_attn.q_proj' -> [N, K] fp32) and the vision tower's ('visual.blocks.0.mlp.gate_proj')."""
    from safetensors.torch import save_file

    state = copy_without_weights(src, dst)
    te_dst = os.path.join(dst, "text_encoder")
    comfy = layout == "comfyui"
    out, dequantized = {}, {}
    for key, t in state.items():
        m = DECODER_LINEAR.match(key) or (VISION_MLP.match(key) if comfy else None)
        name = key if comfy else _new_style(key)  # model.language_model.*, model.visual.*
        if m is None:
            out[name] = t
            continue
        w = t.float()
        if ".k_proj." in key:
            w = 3 * w  # q, k and v of one fused weight with clearly different scales
        data, scale = quantize(w, per_channel=layout.endswith("channel"))
        base = name[:-len(".weight")]
        out[name] = data
        if comfy:
            out[base + ".scale_weight"], out[base + ".scale_input"] = scale, torch.tensor(1.0)
        else:  # llm-compressor keeps scales in the model dtype; a per-tensor one as [1]
            scale = scale.to(torch.bfloat16).reshape(-1, 1) if scale.dim() else scale.to(torch.bfloat16).reshape(1)
            out[base + ".weight_scale"], out[base + ".input_scale"] = scale, torch.ones(1)
        dequantized[m.group(1)] = data.float() * scale.float()
    if comfy:
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)  # the marker ComfyUI reads the fp8 dtype from
        save_file(out, os.path.join(te_dst, "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    else:
        cfg_path = os.path.join(te_dst, "config.json")
        cfg = json.load(open(cfg_path))
        q = json.loads(json.dumps(COMPRESSED_TENSORS_CONFIG))
        if layout.endswith("tensor"):
            q["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
        cfg["quantization_config"] = q
        json.dump(cfg, open(cfg_path, "w"), indent=1)
        save_file(out, os.path.join(te_dst, "model.safetensors"), metadata={"format": "pt"})
    return dequantized


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, tiny_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("fp8-layouts") / request.param)
    return request.param, dst, write_layout(tiny_dir, dst, request.param)


def _args(tiny_dir) -> ModelArgs:
    return ModelArgs.from_text_config(read_text_config(os.path.join(tiny_dir, "text_encoder")))


def test_stored_fp8_loads_as_it_is(layout, tiny_dir):
    name, path, dequantized = layout
    args = _args(tiny_dir)
    sd = load_state_dict(args, resolve_checkpoint(path).text_encoder, CPU, torch.float32, "fp8")
    fused = {"attention.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "feed_forward.w13": ("mlp.gate_proj", "mlp.up_proj"), "attention.wo": ("self_attn.o_proj",),
             "feed_forward.w2": ("mlp.down_proj",)}
    for i in range(args.n_layers):
        for ours, parts in fused.items():
            data, scale = sd[f"layers.{i}.{ours}.weight"], sd[f"layers.{i}.{ours}.weight_scale"]
            assert data.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (data.shape[0],)
            # the stored e4m3 values unchanged (no requantization), each row with its part's scale
            want = torch.cat([dequantized[f"layers.{i}.{p}"] for p in parts])
            torch.testing.assert_close(data.float() * scale[:, None], want, rtol=0, atol=0)
        if name != "compressed-tensors-channel":  # one scale per part, repeated over its rows
            s = sd[f"layers.{i}.attention.wqkv.weight_scale"]
            q, kv = args.q_size, args.kv_size
            assert len(set(s[:q].tolist())) == len(set(s[q:q + kv].tolist())) == 1
            assert s[q] > 1.5 * s[0]  # k's own scale (its weights x3), not q's


def test_stored_fp8_output_matches_the_emulation(layout, tiny_dir):
    _, path, dequantized = layout
    enc = load_encoder(path, backend="kernel", use_triton=False, quantization="fp8")
    want = emulated_encoder(tiny_dir, weights={k: v for k, v in dequantized.items() if k.startswith("layers.")})
    for p, got in zip(PROMPTS, enc.encode(PROMPTS)):
        (w,) = want.encode([p])
        assert got.shape == w.shape and rel_l2(got, w) < EMULATION_TOL, p


def test_stored_fp8_without_quantization_loads_dequantized(layout, tiny_dir):
    _, path, dequantized = layout
    args = _args(tiny_dir)
    sd = load_state_dict(args, resolve_checkpoint(path).text_encoder, CPU, torch.float32)
    for i in range(args.n_layers):
        w = sd[f"layers.{i}.attention.wqkv.weight"]
        assert w.dtype == torch.float32 and f"layers.{i}.attention.wqkv.weight_scale" not in sd
        want = torch.cat([dequantized[f"layers.{i}.self_attn.{p}_proj"] for p in "qkv"])
        torch.testing.assert_close(w, want, rtol=0, atol=0)
        torch.testing.assert_close(sd[f"layers.{i}.feed_forward.w2.weight"], dequantized[f"layers.{i}.mlp.down_proj"],
                                   rtol=0, atol=0)


def test_comfyui_vision_weights_load_dequantized(tiny_dir, tmp_path):
    path = str(tmp_path / "comfyui")
    dequantized = write_layout(tiny_dir, path, "comfyui")  # its vision tower's MLP weights in fp8 as well
    te = resolve_checkpoint(path).text_encoder
    cfg = read_text_config(te).raw
    sd = vision.load_state_dict(vision.VisionArgs.from_config(cfg["vision_config"]), te, CPU, torch.float32)
    want = torch.cat([dequantized["visual.blocks.0.mlp.gate_proj"], dequantized["visual.blocks.0.mlp.up_proj"]])
    torch.testing.assert_close(sd["blocks.0.mlp.w13.weight"], want, rtol=0, atol=0)


def _rewrite(src: str, dst: str, edit_state=None, edit_config=None) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    te = os.path.join(dst, "text_encoder")
    if edit_state is not None:
        path = os.path.join(te, "model.safetensors")
        save_file(edit_state(load_file(path)), path)
    if edit_config is not None:
        cfg = json.load(open(os.path.join(te, "config.json")))
        edit_config(cfg["quantization_config"])
        json.dump(cfg, open(os.path.join(te, "config.json"), "w"))
    return dst


def test_unsupported_quantized_checkpoints_are_refused(tiny_dir, tmp_path):
    src = str(tmp_path / "ct")
    write_layout(tiny_dir, src, "compressed-tensors-channel")
    key = "model.language_model.layers.0.self_attn.q_proj.weight_scale"

    def block_scale(state):  # DeepSeek-style block scales under the usual name
        state[key] = torch.ones(state[key].shape[0] // 32, 2)
        return state

    def inverse_scale(state):
        state[key.replace("weight_scale", "weight_scale_inv")] = state.pop(key)
        return state

    cases = [
        (_rewrite(src, str(tmp_path / "block"), edit_state=block_scale), "only per-tensor and per-output-channel"),
        (_rewrite(src, str(tmp_path / "inv"), edit_state=inverse_scale), "block-wise fp8 scales"),
        (_rewrite(src, str(tmp_path / "awq"), edit_config=lambda q: q.update(quant_method="awq")),
         "quant_method 'awq'"),
        (_rewrite(src, str(tmp_path / "int8"), edit_config=lambda q: q["config_groups"]["group_0"]["weights"].update(
            type="int")), "not float 8-bit"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_encoder(path, backend="kernel", use_triton=False, quantization="fp8")
