"""The kernel backend equals the HF baseline on the tiny checkpoint (CPU, fp32): torch references in-process,
the Triton kernels under TRITON_INTERPRET=1 in a subprocess; prefix cache on and off; the weight loader."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from broker.errors import ModelLoadError
from tests.helpers import REPO
from workers.checkpoint import read_text_config, resolve_checkpoint
from workers.encoders import load_encoder
from workers.model import ops as ops_mod
from workers.model.batch import pack, text_positions
from workers.model.graph_runner import GraphRunner
from workers.model.qwen2_5_vl_text import ModelArgs, load_state_dict
from workers.templates import T2I

PROMPTS = [
    "",
    "fox",
    "🦊 ünïcödé émoji 中文 — naïve café",
    "A " + "very " * 190 + "long prompt about a lighthouse at dusk",
    "a red fox in snow, watercolor, soft light",
]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class EagerRunner(GraphRunner):
    """The graph runner with each capture replayed eagerly: its layout, padding, buckets and gather on the CPU."""

    def _capture_one(self, step):
        return types.SimpleNamespace(replay=step)


@pytest.fixture(scope="module")
def base(tiny_dir):
    # not conftest's `baseline`: PROMPTS run past its max_prompt_tokens
    return load_encoder(tiny_dir, backend="baseline")


@pytest.fixture(scope="module")
def kern(tiny_dir):
    """The torch-reference ops (fast on the CPU); the Triton kernels run in the subprocess test below."""
    return load_encoder(tiny_dir, backend="kernel", use_triton=False)


@pytest.fixture(scope="module")
def want(base):
    """Baseline outputs, prompt by prompt (the baseline pads batches; one at a time is its cleanest answer)."""
    return {p: base.encode([p])[0] for p in PROMPTS + ["\nstarts with a newline"]}


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_kernel_matches_baseline(kern, want, prefix_cache, monkeypatch):
    monkeypatch.setattr(kern, "prefix_cache", prefix_cache)
    got_batch = kern.encode(PROMPTS)
    for p, g in zip(PROMPTS, got_batch):
        assert g.shape == want[p].shape and g.dtype == want[p].dtype
        assert rel_l2(g, want[p]) < 1e-4, p
    for p in PROMPTS[:3]:
        (g,) = kern.encode([p])
        assert g.shape == want[p].shape and rel_l2(g, want[p]) < 1e-4
    if prefix_cache:
        assert "t2i" in kern._prefixes


def test_prefix_cache_is_used_and_equals_uncached(kern, monkeypatch):
    batch = kern.tokenize(PROMPTS)
    assert kern._usable_prefix(batch) is kern.prefix_for("t2i")
    prefix = kern.prefix_for("t2i")
    assert prefix.length == 34 and prefix.k.shape == (3, 34, 2, 16) and prefix.v.shape == prefix.k.shape
    cached, lengths = kern.encode_packed(batch)
    monkeypatch.setattr(kern, "prefix_cache", False)
    uncached, lengths2 = kern.encode_packed(batch)
    assert lengths == lengths2 == batch.output_lengths
    assert cached.shape == (sum(lengths), 64)
    assert rel_l2(cached, uncached) < 1e-5


def test_prompt_that_breaks_the_prefix_falls_back(kern, want):
    # "\n" right after "user\n" merges into one BPE token: the first 34 ids differ from the template's
    p = "\nstarts with a newline"
    batch = kern.tokenize([p, "fox"])
    assert kern._usable_prefix(batch) is None
    g, f = kern.encode([p, "fox"])
    assert rel_l2(g, want[p]) < 1e-4 and rel_l2(f, want["fox"]) < 1e-4


def test_encode_packed_views(kern):
    packed, lengths = kern.encode_packed(kern.tokenize(PROMPTS[:3]))
    outs = kern.encode(PROMPTS[:3])
    assert [o.shape[0] for o in outs] == lengths
    torch.testing.assert_close(torch.cat(outs), packed, rtol=0, atol=0)


def test_padded_bucket_layout_equals_unpadded(kern):
    """The CUDA-graph layout (fixed slots, empty slots, a dummy pad sequence, max_seqlen = bucket) run eagerly."""
    batch = kern.tokenize(PROMPTS[:3])
    prefix = kern.prefix_for("t2i")
    seqs = [ids[34:] for ids in batch.ids]
    pos = [text_positions(34, len(s)) for s in seqs]
    ref, _ = kern.encode_packed(batch)
    for bucket, slots in ((sum(map(len, seqs)), 3), (64, 6)):
        hb = pack(seqs, pos, None, n_tokens=bucket, n_slots=slots, pad_pos_start=34)
        ids, p, cu, keep = hb.layout.views(hb.buf)
        with torch.inference_mode():
            out = kern.model(ids, p, cu, bucket, prefix).index_select(0, keep)
        assert out.shape == ref.shape and rel_l2(out, ref) < 1e-6


def test_extra_embeds_splice(kern):
    """Image embeddings replace the image-pad tokens' rows; splicing their own embedding changes nothing."""
    batch = kern.tokenize(["look: <|image_pad|><|image_pad|> here"])
    ids = torch.tensor(batch.ids[0])
    n = int((ids == kern.config.image_token_id).sum())
    assert n == 2
    own = kern.model.embed(torch.full((n,), kern.config.image_token_id))
    plain, _ = kern.encode_packed(batch)
    same, _ = kern.encode_packed(batch, extra_embeds=own)
    other, _ = kern.encode_packed(batch, extra_embeds=own + 1.0)
    torch.testing.assert_close(same, plain)
    first = int(torch.nonzero(ids[34:] == kern.config.image_token_id)[0])
    torch.testing.assert_close(other[:first], plain[:first])  # causal: rows before the image are untouched
    assert rel_l2(other[first:], plain[first:]) > 1e-3
    full = [np.broadcast_to(np.arange(len(batch.ids[0]), dtype=np.int32), (3, len(batch.ids[0])))]
    explicit, _ = kern.encode_packed(batch, positions=full)
    torch.testing.assert_close(explicit, plain)


def test_cpu_has_no_graph_runner_and_unknown_options_fail(kern, tiny_dir):
    assert kern.graphs is None and kern.model.ops.attention_name == "reference"
    with pytest.raises(ModelLoadError, match="unknown kernel encoder options: bogus"):
        load_encoder(tiny_dir, backend="kernel", use_triton=False, bogus=1)


def copy_without_weights(src: str, dst: str) -> dict[str, torch.Tensor]:
    """The checkpoint at `src` copied to `dst` without its weight files and index; its weights, to write anew."""
    from safetensors import safe_open

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    te_src, state = os.path.join(src, "text_encoder"), {}
    for name in sorted(os.listdir(te_src)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(te_src, name), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


def _rewrite_checkpoint(src: str, dst: str, rename, drop: str | None = None) -> None:
    from safetensors.torch import save_file

    state = {rename(k): v for k, v in copy_without_weights(src, dst).items() if k != drop}
    save_file(state, os.path.join(dst, "text_encoder", "model.safetensors"), metadata={"format": "pt"})


def _new_style(name: str) -> str:
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model.visual." + name[len("visual."):]
    return name


def test_new_style_key_names_load_identically(tiny_dir, tmp_path):
    new = str(tmp_path / "new")
    _rewrite_checkpoint(tiny_dir, new, _new_style)
    args = ModelArgs.from_text_config(read_text_config(os.path.join(tiny_dir, "text_encoder")))
    assert args == ModelArgs.from_name("tiny")
    cpu = torch.device("cpu")
    legacy = load_state_dict(args, resolve_checkpoint(tiny_dir).text_encoder, cpu, torch.float32)
    renamed = load_state_dict(args, resolve_checkpoint(new).text_encoder, cpu, torch.float32)
    assert legacy.keys() == renamed.keys()
    for k in legacy:
        torch.testing.assert_close(legacy[k], renamed[k], rtol=0, atol=0)
    # fused at load: q/k/v (+bias) rows, then gate/up rows
    assert legacy["layers.0.attention.wqkv.weight"].shape == (64 + 2 * 32, 64)
    assert legacy["layers.0.attention.wqkv.bias"].shape == (128,)
    assert legacy["layers.0.feed_forward.w13.weight"].shape == (2 * 160, 64)

    broken = str(tmp_path / "broken")
    _rewrite_checkpoint(tiny_dir, broken, lambda n: n, drop="model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(ModelLoadError, match="lacks decoder weights"):
        load_state_dict(args, resolve_checkpoint(broken).text_encoder, cpu, torch.float32)


_INTERPRET_SCRIPT = r"""
import json, sys, torch
from workers.encoders import load_encoder
from workers.model.batch import pack, text_positions
prompts = json.loads(sys.argv[2])
enc = load_encoder(sys.argv[1], backend="kernel")
ops = enc.model.ops
names = [ops.attention_name, ops.rms_norm.__name__, ops.qkv_rope.__name__, ops.silu_mul.__name__]
cached = enc.encode(prompts)
enc.prefix_cache = False
uncached = enc.encode(prompts)
# the CUDA-graph bucket layout through the Triton kernels: padded tokens, empty slots, max_seqlen = bucket
batch = enc.tokenize(prompts)
seqs = [ids[34:] for ids in batch.ids]
hb = pack(seqs, [text_positions(34, len(s)) for s in seqs], None, n_tokens=48, n_slots=len(seqs) + 3,
          pad_pos_start=34)
ids, pos, cu, keep = hb.layout.views(hb.buf)
with torch.inference_mode():
    padded = enc.model(ids, pos, cu, 48, enc.prefix_for("t2i")).index_select(0, keep)
torch.save({"names": names, "cached": cached, "uncached": uncached, "padded": padded}, sys.argv[3])
"""


def test_triton_kernels_interpreted_match_baseline(tiny_dir, want, tmp_path):
    prompts = PROMPTS[:3]
    out = str(tmp_path / "out.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_SCRIPT, tiny_dir, json.dumps(prompts), out], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(out)
    assert res["names"] == ["triton", "rms_norm", "qkv_rope", "silu_and_mul"]
    for variant in ("cached", "uncached"):
        for p, g in zip(prompts, res[variant]):
            assert g.shape == want[p].shape
            assert rel_l2(g, want[p]) < 1e-4, (variant, p)
    ref = torch.cat([want[p] for p in prompts])
    assert rel_l2(res["padded"], ref) < 1e-4


@pytest.mark.parametrize("use_triton", [False, True])
def test_attention_dispatch_in_the_model(kern, want, monkeypatch, use_triton):
    """A stand-in library kernel (ops.LIBRARY_KERNELS) serves the uncached batches; the cached ones go to our
    Triton attention (here interpreted; the other ops stay torch references for speed) or, where Triton is
    off, to the library through the per-layer [prefix ++ own] gather."""
    from tests.test_kernels_ops import fake_library  # not at the top: that module skips itself without Triton

    calls: list = []
    monkeypatch.setattr(ops_mod, "LIBRARY_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(ops_mod, "LIBRARY_KERNELS", (("fake", fake_library(calls)),))
    a = kern.model.args
    options = ops_mod.KernelOptions(use_triton=use_triton, use_rmsnorm_kernel=False, use_rope_kernel=False,
                                    use_silu_kernel=False)
    ops = ops_mod.Ops(torch.device("cpu"), torch.float32, a.n_heads, a.n_kv_heads, a.head_dim, options)
    prefix_attention = "triton" if use_triton else "fake"
    assert ops.attention_names == {"no_prefix": "fake", "prefix": prefix_attention}
    monkeypatch.setattr(kern.model, "ops", ops)
    for prefix_cache in (True, False):
        monkeypatch.setattr(kern, "prefix_cache", prefix_cache)
        calls.clear()
        for p, g in zip(PROMPTS, kern.encode(PROMPTS)):
            assert g.shape == want[p].shape and rel_l2(g, want[p]) < 1e-4, (prefix_cache, p)
        if prefix_cache:
            assert calls == ([] if use_triton else ["prefix"] * a.n_layers)
        else:
            assert calls == ["plain"] * a.n_layers


def test_ffn_row_chunks_change_nothing(kern, monkeypatch):
    batch = kern.tokenize(PROMPTS[:3])
    whole, _ = kern.encode_packed(batch)
    monkeypatch.setattr(kern.model.ops, "ffn_chunk_tokens", 7)
    chunked, _ = kern.encode_packed(batch)
    assert rel_l2(chunked, whole) < 1e-6


def test_graph_runner_buffers_and_buckets_on_cpu(kern, monkeypatch):
    """The runner's static layout, padding, bucket choice and output gather equal the eager path's."""
    runner = EagerRunner(kern.model, torch.device("cpu"), max_tokens=64, max_seqs=3, buckets=(16, 32, 64, 128))
    assert runner.buckets == (16, 32, 64)
    cases = [PROMPTS[:1], PROMPTS[1:3], PROMPTS[:3], PROMPTS[:4], [PROMPTS[1]] * 4]
    replays = []
    for prefix_cache in (True, False):
        monkeypatch.setattr(kern, "prefix_cache", prefix_cache)
        for i, prompts in enumerate(cases):
            batch = kern.tokenize(prompts)
            monkeypatch.setattr(kern, "graphs", None)
            want, want_lengths = kern.encode_packed(batch)
            monkeypatch.setattr(kern, "graphs", runner)
            computed = sum(len(x) - (34 if prefix_cache else 0) for x in batch.ids)
            replays.append(runner.bucket_for(computed, len(prompts)))
            packed, lengths = kern.encode_packed(batch)
            assert lengths == want_lengths and packed.shape == want.shape
            assert rel_l2(packed, want) < 1e-6, (prefix_cache, i)
    # graphs for both prefixes (the t2i cache and none), and both replayed and eager batches were seen
    assert {k[0] for k in runner.graphs} == {id(kern.prefix_for("t2i")), id(None)}
    assert any(r is None for r in replays) and any(r is not None for r in replays)


def test_raw_inputs_run_uncached_and_match(kern, base):
    """Raw (already templated) inputs keep every row (drop_idx 0): the prefix cache stays out of the way."""
    texts = [T2I.format("a red fox"), "<|im_start|>user\nno system prompt<|im_end|>\n"]
    batch = kern.tokenize(texts, raw=True)
    assert batch.drop_idx == 0 and kern._usable_prefix(batch) is None
    got = kern.encode_tokens(batch)
    want = base.encode_tokens(base.tokenize(texts, raw=True))
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_l2(g, w) < 1e-4
