"""Our vision tower (workers.model.qwen2_5_vl_vision) against HF's Qwen2_5_VisionTransformerPretrainedModel on the
tiny checkpoint in fp32: several images of varied aspect ratios in one forward, windows cut short at the edges."""

import json
import shutil

import numpy as np
import pytest
import torch

from broker.errors import ModelLoadError
from tests.kernel_checks import rel_l2, seed  # imported first: sets TRITON_INTERPRET
from workers.checkpoint import read_text_config
from workers.model.ops import KernelOptions
from workers.model.qwen2_5_vl_vision import VisionArgs, load_vision, vision_layout

# (t, h, w) patches: square, wide, tall, one merge unit, windows cut short on both axes, two frames
GRIDS = [(1, 16, 24), (1, 34, 12), (1, 2, 2), (1, 22, 40), (1, 8, 8)]
# the Triton kernels run in the interpreter here: fewer patches, windows still cut short on both axes
SMALL_GRIDS = [(1, 10, 12), (1, 2, 2), (1, 4, 18)]


@pytest.fixture(scope="module")
def hf_tower(baseline):
    return baseline.model.model.visual.float().eval()


@pytest.fixture(scope="module", params=[False, True], ids=["reference", "triton"])
def ours(request, baseline):
    te = baseline.paths.text_encoder
    return load_vision(te, read_text_config(te).raw, torch.device("cpu"), torch.float32,
                       KernelOptions(use_triton=request.param))


def _patches(grids, case):
    seed("vision", case)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 14 * 14)


@pytest.mark.parametrize("case", ["images", "one-tall", "two-frames"])
def test_vision_tower_equals_hf(hf_tower, ours, case):
    triton = ours.ops.attention_name == "triton"
    grids = {"images": SMALL_GRIDS if triton else GRIDS, "one-tall": [(1, 14, 6)] if triton else [(1, 34, 12)],
             "two-frames": [(2, 4, 10)] if triton else [(2, 8, 12)]}[case]
    x = _patches(grids, grids)
    with torch.inference_mode():
        want = hf_tower(x, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(x, grids)
    assert got.shape == want.shape == (sum(t * h * w for t, h, w in grids) // 4, ours.args.out_dim)
    assert rel_l2(got, want) < 1e-5


def test_images_in_one_forward_equal_each_alone(ours):
    grids = SMALL_GRIDS if ours.ops.attention_name == "triton" else GRIDS
    x = _patches(grids, "alone")
    with torch.inference_mode():
        together = ours(x, grids)
        alone = [ours(part, [g]) for part, g in zip(torch.split(x, [t * h * w for t, h, w in grids]), grids)]
    assert rel_l2(together, torch.cat(alone)) < 1e-6


def test_layout_matches_hf_window_index():
    from transformers.vision_utils import get_vision_window_index

    args = VisionArgs(depth=1, dim=32, n_heads=2, intermediate_size=8, out_dim=8)
    layout = vision_layout(GRIDS, args)
    order, pos, cu_win, cu_img, restore = (v.numpy() for v in layout.views(torch.from_numpy(layout.buf)))
    window_index, cu_window = get_vision_window_index(torch.tensor(GRIDS), 2, 112, 14)
    units = order[::4] // 4
    assert np.array_equal(units, window_index.numpy())
    assert np.array_equal(cu_win, cu_window.numpy())
    assert np.array_equal(cu_img, np.cumsum([0] + [h * w for _, h, w in GRIDS]))
    assert np.array_equal(units[restore], np.arange(len(units)))
    assert layout.max_window == np.diff(cu_window.numpy()).max() == 64


def test_vision_weights_checked_on_load(baseline, tmp_path):
    te = tmp_path / "te"
    shutil.copytree(baseline.paths.text_encoder, te)
    raw = read_text_config(str(te)).raw
    raw["vision_config"]["depth"] = 3  # one block more than the weights hold
    (te / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="lacks vision weights"):
        load_vision(str(te), raw, torch.device("cpu"), torch.float32)
    raw["vision_config"]["depth"] = 1  # one block fewer
    with pytest.raises(ModelLoadError, match="does not fit a vision tower of depth 1"):
        load_vision(str(te), raw, torch.device("cpu"), torch.float32)

