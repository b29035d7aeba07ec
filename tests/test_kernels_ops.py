"""The op table's attention dispatch (workers/model/ops.py) with a stand-in library kernel on the CPU: which
kernel serves batches with and without a cached prefix under each switch, the self-checks, the log lines."""

import logging

import pytest
import torch

from tests.kernel_checks import DEVICE, cu_seqlens  # imported first: sets TRITON_INTERPRET
from workers.kernels import varlen_attention_ref
from workers.model import ops as ops_mod
from workers.model.ops import KernelOptions, Ops, build_attn_meta

N_Q, N_KV, HEAD_DIM = 4, 2, 16


def fake_library(calls: list, top_left: bool = False, broken: bool = False):
    """A factory like ops._make_torch_varlen: varlen attention over [prefix ++ own] keys via the ops gather,
    per sequence with SDPA. top_left: the causal mask of flash-attn < 2.1 (wrong once keys outnumber queries)."""

    def make():
        def attn(q, k, v, meta, scale, pk, pv):
            calls.append("prefix" if pk is not None else "plain")
            k, v, cu_k, _ = ops_mod._with_prefix(k, v, meta, pk, pv)
            out = torch.empty_like(q)
            cq, ck = meta.cu_seqlens.tolist(), cu_k.tolist()
            for b in range(len(cq) - 1):
                qs = q[cq[b]:cq[b + 1]].transpose(0, 1)
                ks = k[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(N_Q // N_KV, 0)
                vs = v[ck[b]:ck[b + 1]].transpose(0, 1).repeat_interleave(N_Q // N_KV, 0)
                Lq, Lk = qs.shape[1], ks.shape[1]
                if Lq == 0:
                    continue
                mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(0 if top_left else Lk - Lq)
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
                out[cq[b]:cq[b + 1]] = o.transpose(0, 1)
            return out * 0 if broken else out

        return attn

    return make


def _missing():
    raise ImportError("no such library")


@pytest.fixture
def library(monkeypatch):
    """Installs stand-ins as the library kernels, allowed on the CPU; returns the list their calls go to."""
    calls: list = []
    monkeypatch.setattr(ops_mod, "LIBRARY_DEVICE_TYPES", ("cpu", "cuda"))
    monkeypatch.setattr(ops_mod, "LIBRARY_KERNELS", (("missing", _missing), ("fake", fake_library(calls))))
    monkeypatch.setattr(ops_mod, "_logged", set())  # every test sees its own log lines
    return calls


def _ops(**switches) -> Ops:
    return Ops(torch.device(DEVICE), torch.float32, N_Q, N_KV, HEAD_DIM, KernelOptions(**switches))


def _run(ops: Ops, with_prefix: bool) -> None:
    """One batch through ops.attention against the reference, the meta built as the model builds it."""
    gen = torch.Generator().manual_seed(7)
    lens, P = [3, 0, 19, 1], 5
    T = sum(lens)
    q, k, v = (torch.randn(T, h, HEAD_DIM, generator=gen).to(DEVICE) for h in (N_Q, N_KV, N_KV))
    pk, pv = (torch.randn(P, N_KV, HEAD_DIM, generator=gen).to(DEVICE) for _ in range(2))
    if not with_prefix:
        pk = pv = None
    cu = cu_seqlens(lens)
    meta = build_attn_meta(cu, max(lens), P if with_prefix else 0, T, ops.needs_kv_index)
    got = ops.attention(q, k, v, meta, HEAD_DIM**-0.5, pk, pv)
    want = varlen_attention_ref(q, k, v, cu, max(lens), HEAD_DIM**-0.5, pk, pv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _choice_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: ")
            and " for " in r.getMessage()]


def test_default_library_without_prefix_triton_with_prefix(library, caplog):
    caplog.set_level(logging.INFO, logger="workers.model.ops")
    ops = _ops()
    assert ops.attention_names == {"no_prefix": "fake", "prefix": "triton"}
    assert ops.attention_name == "fake (prefix: triton)" and not ops.needs_kv_index
    library.clear()  # the self-checks called it too
    _run(ops, with_prefix=False)
    _run(ops, with_prefix=True)
    assert library == ["plain"]  # the prefixed batch went to Triton, which reads the prefix in place
    assert any("missing is not available; trying the next backend" in m for m in caplog.messages)
    assert _choice_lines(caplog) == ["attention: fake for batches without a prefix, triton for batches with a "
                                     "cached prefix (prefix read in place)"]


def test_library_with_gather_for_prefix_when_triton_attention_is_off(library):
    ops = _ops(use_triton_attention=False)
    assert ops.attention_names == {"no_prefix": "fake", "prefix": "fake"} and ops.needs_kv_index
    library.clear()
    _run(ops, with_prefix=True)
    _run(ops, with_prefix=False)
    assert library == ["prefix", "plain"]


def test_no_library_means_triton_for_every_batch(library, caplog):
    caplog.set_level(logging.INFO, logger="workers.model.ops")
    for switches in ({"use_flash_attention_kernel": False},
                     {"use_flash_attention_kernel": False, "use_triton_attention": False}):
        ops = _ops(**switches)
        assert ops.attention_name == "triton" and not ops.needs_kv_index
        _run(ops, with_prefix=True)
        _run(ops, with_prefix=False)
    assert library == []  # never even built
    assert _choice_lines(caplog) == ["attention: triton for every batch (with a cached prefix: prefix read in place)"]


def test_without_triton_a_library_beats_the_reference_for_prefixed_batches(library):
    ops = _ops(use_triton=False)
    assert ops.attention_names == {"no_prefix": "fake", "prefix": "fake"} and ops.needs_kv_index
    ops = _ops(use_triton=False, use_flash_attention_kernel=False)
    assert ops.attention_name == "reference"
    _run(ops, with_prefix=True)


def test_library_failing_only_with_a_prefix_serves_only_plain_batches(monkeypatch, library, caplog):
    calls: list = []
    monkeypatch.setattr(ops_mod, "LIBRARY_KERNELS", (("topleft", fake_library(calls, top_left=True)),))
    ops = _ops(use_triton_attention=False)
    assert ops.attention_names == {"no_prefix": "topleft", "prefix": "triton"} and not ops.needs_kv_index
    assert any("topleft failed its self-check with a prefix" in m for m in caplog.messages)
    _run(ops, with_prefix=False)
    _run(ops, with_prefix=True)


def test_broken_library_is_not_trusted(monkeypatch, library, caplog):
    monkeypatch.setattr(ops_mod, "LIBRARY_KERNELS", (("broken", fake_library([], broken=True)),))
    ops = _ops()
    assert ops.attention_name == "triton"
    assert any("broken failed its self-check" in m for m in caplog.messages)


def test_cpu_without_a_library_needs_no_log_about_libraries(caplog):
    caplog.set_level(logging.INFO, logger="workers.model.ops")
    ops = Ops(torch.device("cpu"), torch.float32, N_Q, N_KV, HEAD_DIM, KernelOptions(use_triton=False))
    assert ops.attention_name == "reference" and ops.qkv_rope.__name__ == "qkv_rope_ref"
    assert not any("trying the next backend" in m for m in caplog.messages)
