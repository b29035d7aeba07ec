import pytest
import torch

from tests.kernel_checks import DEVICE, DTYPES, check_fp8_rows, rel_l2, seed  # first: sets TRITON_INTERPRET
from workers.kernels import quantize_rows_ref, silu_and_mul_ref, silu_mul_quant, silu_mul_quant_ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("inter", [8, 24, 40, 96, 1100])
@pytest.mark.parametrize("max_block", [16, 4096])  # 16: each row in several column blocks, the last one ragged
def test_silu_mul_quant_matches_ref(dtype, T, inter, max_block):
    seed("silu-quant", dtype, T, inter, max_block)
    x = (2.0 * torch.randn(T, 2 * inter, device=DEVICE)).to(dtype)
    ref = silu_mul_quant_ref(x)
    out = silu_mul_quant(x, max_block=max_block)
    check_fp8_rows(out, ref, dtype)


def test_silu_mul_quant_amax_in_the_last_block():
    # the row maximum sits in the ragged last column block: the scale comes from the first pass over all blocks
    x = torch.zeros(2, 2 * 40, device=DEVICE)
    x[:, :40] = 1.0
    x[:, 40:] = 0.01
    x[0, 39], x[0, 79] = 4.0, 100.0  # gate, up of column 39
    out = silu_mul_quant(x, max_block=16)
    check_fp8_rows(out, silu_mul_quant_ref(x), torch.float32)
    assert out.data[0, 39].float() == 448.0


def test_silu_mul_quant_ref_is_quantized_silu_mul():
    seed("silu-quant-ref")
    x = torch.randn(5, 48)
    q = silu_mul_quant_ref(x)
    want = quantize_rows_ref(silu_and_mul_ref(x))
    torch.testing.assert_close(q.dequantize(), want.dequantize(), rtol=0, atol=0)
    assert rel_l2(q.dequantize(), silu_and_mul_ref(x)) < 0.05


def test_silu_mul_quant_rejects_bad_inputs():
    with pytest.raises(AssertionError, match="even"):
        silu_mul_quant(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(AssertionError, match="contiguous"):
        silu_mul_quant(torch.randn(8, 4, device=DEVICE).t())
