"""quantization "fp8" on the CPU: the kernel backend runs its quantized numbers through the dequantized reference
GEMM, and equals an emulation of the quantized math on HF's model (tests/fp8_emulation.py) at odd prompt lengths,
with the torch references and with the Triton kernels (interpreted); the weights at load; the FP8 GEMM alone."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from broker.errors import ModelLoadError
from tests.fp8_emulation import emulated_encoder, fake_quant
from tests.helpers import REPO
from tests.test_i2i_encoder import SQUARE, WIDE
from tests.test_kernel_encoder import EagerRunner, rel_l2
from workers.encoders import load_encoder
from workers.encoding_cache import EncodingCache
from workers.kernels import quantize_rows_ref
from workers.model import fp8

# user parts of 2, 1, 12 and 40 tokens after the template prefix: odd lengths, one over the FFN chunk below
PROMPTS = ["fox", "", "a red fox in snow, watercolor, soft light", "A " + "very " * 37 + "long"]
# the emulation differs from the kernel backend by fp32 rounding (fused q/k/v, attention order) only; fp8 against
# the unquantized model is ~0.06 on the tiny checkpoint
EMULATION_TOL = 1e-5


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load_encoder(tiny_dir, backend="kernel", use_triton=False)


@pytest.fixture(scope="module")
def quant(tiny_dir):
    return load_encoder(tiny_dir, backend="kernel", use_triton=False, quantization="fp8")


@pytest.fixture(scope="module")
def emulated(tiny_dir):
    enc = emulated_encoder(tiny_dir)
    return {p: enc.encode([p])[0] for p in PROMPTS}


def test_weights_quantized_at_load(quant, plain):
    q_layers, p_layers = quant.model.layers, plain.model.layers
    for ql, pl in zip(q_layers, p_layers):
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2"):
            q, p = ql.get_submodule(name), pl.get_submodule(name)
            assert isinstance(q, fp8.Fp8Linear) and q.weight.dtype == torch.float8_e4m3fn
            assert q.weight_scale.shape == (q.out_features,) and q.weight_scale.dtype == torch.float32
            # per output channel: the row's |max| maps to 448, exactly as the emulation's fake_quant
            want = p.weight.abs().amax(dim=1) / 448.0
            torch.testing.assert_close(q.weight_scale, want, rtol=0, atol=0)
            deq = q.weight.float() * q.weight_scale[:, None]
            torch.testing.assert_close(deq, fake_quant(p.weight), rtol=0, atol=0)
        torch.testing.assert_close(ql.attention.wqkv.bias, pl.attention.wqkv.bias, rtol=0, atol=0)
        assert ql.attention_norm.weight.dtype == quant.dtype  # norms stay in the model dtype
    assert quant.model.tok_embeddings.weight.dtype == quant.dtype
    bytes_of = lambda m: sum(t.numel() * t.element_size() for t in m.layers.parameters())
    assert bytes_of(quant.model) < 0.3 * bytes_of(plain.model)  # fp32 on the CPU: e4m3 is a quarter


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_fp8_matches_the_emulated_quantized_math(quant, plain, emulated, prefix_cache, monkeypatch):
    monkeypatch.setattr(quant, "prefix_cache", prefix_cache)
    batched = quant.encode(PROMPTS)
    for p, got, unquantized in zip(PROMPTS, batched, plain.encode(PROMPTS)):
        assert got.shape == emulated[p].shape and got.dtype == emulated[p].dtype
        assert rel_l2(got, emulated[p]) < EMULATION_TOL, p
        assert rel_l2(got, unquantized) > 100 * EMULATION_TOL  # it is the quantized model that matched
    for p in PROMPTS[:2]:
        (got,) = quant.encode([p])
        assert rel_l2(got, emulated[p]) < EMULATION_TOL


class _HFTower:
    """The emulation's own vision tower where the kernel encoder calls its tower: both decoders then read the same
    image features (an fp32 difference in them would move some values across an e4m3 rounding boundary, a
    visible step at the tiny model's width)."""

    def __init__(self, hf_tower, args):
        self.tower, self.args = hf_tower, args

    def __call__(self, pixel_values, grids):
        return self.tower(pixel_values, grid_thw=torch.tensor(grids)).pooler_output


def test_fp8_i2i_matches_the_emulation(quant, plain, tiny_dir, monkeypatch):
    # the vision tower stays unquantized; its features go through the quantized decoder
    emulation = emulated_encoder(tiny_dir)
    assert quant.vision.blocks[0].mlp.w13.weight.dtype == quant.dtype
    prompts, images = ["make it blue", "x"], [[WIDE], [SQUARE, WIDE]]
    unquantized = plain.encode(prompts, task="i2i", images=images)
    monkeypatch.setattr(quant, "vision", _HFTower(emulation.model.model.visual, quant.vision.args))
    monkeypatch.setattr(quant, "feature_cache", EncodingCache(0))
    want = emulation.encode(prompts, task="i2i", images=images)
    for g, w, u in zip(quant.encode(prompts, task="i2i", images=images), want, unquantized):
        # ~200 rows with 3-D positions: the two models' fp32 differences (M-RoPE, attention order) move a few
        # values across an e4m3 rounding boundary, each a visible step at width 64, yet far below fp8's own error
        assert g.shape == w.shape and rel_l2(g, w) < 5e-3 and rel_l2(g, w) < 0.1 * rel_l2(g, u)


def test_fp8_graph_layout_and_ffn_chunks(quant, monkeypatch):
    """The CUDA-graph runner's padded layout (run eagerly) and the MLP's row chunks (its `out=` GEMMs) change
    nothing in the fp8 path."""
    batch = quant.tokenize(PROMPTS)
    want, _ = quant.encode_packed(batch)
    monkeypatch.setattr(quant.model.ops, "ffn_chunk_tokens", 7)
    chunked, _ = quant.encode_packed(batch)
    assert rel_l2(chunked, want) < 1e-6
    monkeypatch.undo()
    runner = EagerRunner(quant.model, torch.device("cpu"), max_tokens=128, max_seqs=4, buckets=(64, 128))
    monkeypatch.setattr(quant, "graphs", runner)
    replayed, _ = quant.encode_packed(batch)
    assert runner.graphs and rel_l2(replayed, want) < 1e-6


_INTERPRETED = r"""
import json, sys, torch
from workers.encoders import load_encoder
from workers.encoding_cache import EncodingCache
enc = load_encoder(sys.argv[1], backend="kernel", quantization="fp8")
ops = enc.model.ops
names = [ops.rms_norm_act.__name__, ops.silu_mul_act.__name__, ops.act.__name__, ops.attention_name]
torch.save({"names": names, "out": enc.encode(json.loads(sys.argv[2]))}, sys.argv[3])
"""


def test_fp8_triton_kernels_interpreted_match_the_emulation(tiny_dir, emulated, tmp_path):
    out = str(tmp_path / "out.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED, tiny_dir, json.dumps(PROMPTS[:3]), out], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(out)
    assert res["names"] == ["rms_norm_quant", "silu_mul_quant", "quantize_rows", "triton"]
    for p, got in zip(PROMPTS, res["out"]):
        # the interpreter's own float rounding flips an e4m3 step now and then: still far below fp8's own error
        assert rel_l2(got, emulated[p]) < 1e-3, p


def test_fp8_refused_where_it_cannot_run(tiny_dir):
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        load_encoder(tiny_dir, backend="kernel", use_triton=False, quantization="int4")
    with pytest.raises(ModelLoadError, match="needs backend 'kernel'"):
        load_encoder(tiny_dir, backend="baseline", quantization="fp8")


# --- the GEMM alone ----------------------------------------------------------------------------------------------

def _layer(N: int, K: int, bias: bool, seed: int) -> tuple[fp8.Fp8Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, N)[:, None]  # rows of different magnitudes
    layer = fp8.Fp8Linear(K, N, bias)
    data, scale = fp8.quantize_weight(w)
    layer.weight.data, layer.weight_scale.data = data, scale
    if bias:
        layer.bias.data = torch.randn(N, generator=g)
    return layer, w


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K,N", [(24, 8), (40, 96), (96, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_is_the_quantized_product(M, K, N, bias):
    layer, w = _layer(N, K, bias, seed=M * 1000 + K + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + K + N)) * 3
    want = F.linear(fake_quant(x), fake_quant(w), layer.bias)  # the emulation's math
    a = quantize_rows_ref(x)
    got = fp8.linear_dequantized(a, layer, torch.float32)
    assert got.shape == (M, N) and rel_l2(got, want) < 1e-6
    out = torch.full((M + 2, N), float("nan"))
    assert fp8.linear_dequantized(a, layer, torch.float32, out=out[1:M + 1]).data_ptr() == out[1].data_ptr()
    torch.testing.assert_close(out[1:M + 1], got)
    bf16 = fp8.linear_dequantized(a, layer, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and rel_l2(bf16, got) < 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_path_computes_the_same_product(bias):
    """The CUDA path's call (operand layouts, row-wise scale shapes) run by torch's CPU _scaled_mm, where this
    torch has one, against the dequantized reference."""
    M, K, N = 17, 48, 32  # _scaled_mm wants K and N multiples of 16
    layer, _ = _layer(N, K, bias, seed=7)
    a = quantize_rows_ref(torch.randn(M, K, generator=torch.Generator().manual_seed(8)))
    try:
        got = fp8.linear_scaled_mm(a, layer, torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"no CPU _scaled_mm in torch {torch.__version__}: {e}")
    want = fp8.linear_dequantized(a, layer, torch.float32)
    assert rel_l2(got, want) < 1e-6
    out = torch.empty(M, N)
    fp8.linear_scaled_mm(a, layer, torch.float32, out=out)
    torch.testing.assert_close(out, got)


def test_config_key_and_its_variable_load_the_fp8_encoder(tiny_dir, tmp_path, monkeypatch):
    from tests.helpers import write_config
    from workers.__main__ import load_configured_encoder
    from workers.config import EncoderWorkerConfig

    assert EncoderWorkerConfig.from_json(None).quantization is None  # off by default
    path = write_config(str(tmp_path / "encoder.json"), model_dir=tiny_dir, device="cpu", quantization="fp8")
    cfg = EncoderWorkerConfig.from_json(path)
    assert (cfg.quantization, cfg.backend) == ("fp8", "auto")
    enc = load_configured_encoder(cfg)  # "auto" on the CPU would be the baseline: fp8 takes the kernel backend
    assert enc.backend == "kernel" and enc.quantization == "fp8"
    assert enc.model.layers[0].feed_forward.w2.weight.dtype == torch.float8_e4m3fn
    monkeypatch.setenv("EB_QUANTIZATION", "null")
    assert EncoderWorkerConfig.from_json(path).quantization is None
    monkeypatch.setenv("EB_QUANTIZATION", "int4")
    with pytest.raises(ValueError, match="quantization 'int4' is not one of null, \"fp8\""):
        EncoderWorkerConfig.from_json(path)
