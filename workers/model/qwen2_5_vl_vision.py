"""Qwen2.5-VL's vision tower over packed varlen batches: the kernel backend's image encoder.

gpt-fast style, like qwen2_5_vl_text: one file, a dataclass of args, modules built on the meta device and assigned
the checkpoint's `visual.*` tensors streamed into device buffers; the Conv3d patch embedding (stride == kernel)
becomes one GEMM over flattened patches, the MLP's gate and up one fused `w13`.

All of a batch's images go through one forward. The host computes, per batch, Qwen2.5-VL's window order (merge
units of m x m patches grouped into windows of `window_size` pixels), each patch's (row, column) for the 2-D
RoPE, and the cu_seqlens of the windows and of the whole images; one int32 buffer carries them to the device.
Patches run in window order throughout (window attention and full attention both see contiguous sequences), and
the merged rows are put back in image order at the end, as HF's Qwen2_5_VisionTransformerPretrainedModel does.

Notation: N patches in the batch, D hidden, H heads, Dh head dim, I intermediate, m merge size, U = N / m^2
merge units (= output rows), Do the decoder's hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from broker.errors import ModelLoadError
from workers.checkpoint import canonical_name, iter_tensors, safetensors_files
from workers.model.batch import Staging
from workers.model.ops import KernelOptions, Ops


@dataclass(slots=True)
class VisionArgs:
    depth: int = 32
    dim: int = 1280
    n_heads: int = 16
    intermediate_size: int = 3420
    out_dim: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    window_size: int = 112  # pixels
    fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    head_dim: int = field(init=False)
    patch_dim: int = field(init=False)  # C * Tp * P * P: one flattened patch
    merged_dim: int = field(init=False)  # D * m^2: one merge unit's patches side by side
    window_units: int = field(init=False)  # merge units per window side

    def __post_init__(self):
        assert self.dim % self.n_heads == 0, "vision hidden size must be a multiple of its heads"
        self.head_dim = self.dim // self.n_heads
        assert self.head_dim % 4 == 0, "the 2-D RoPE splits head_dim / 2 into equal row and column parts"
        self.patch_dim = self.in_channels * self.temporal_patch_size * self.patch_size ** 2
        self.merged_dim = self.dim * self.merge_size ** 2
        self.window_units = self.window_size // self.merge_size // self.patch_size
        assert self.window_units >= 1, "window_size must cover at least one merge unit"

    @classmethod
    def from_config(cls, vc: dict) -> "VisionArgs":
        """From a checkpoint's `vision_config` (Qwen2.5-VL's names)."""
        act = vc.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"vision_config hidden_act {act!r}: the vision tower implements Qwen2.5-VL's SiLU "
                                 "gated MLP only")
        rope = vc.get("rope_parameters") or {}
        try:
            return cls(depth=vc["depth"], dim=vc["hidden_size"], n_heads=vc["num_heads"],
                       intermediate_size=vc["intermediate_size"], out_dim=vc["out_hidden_size"],
                       patch_size=vc.get("patch_size", 14), temporal_patch_size=vc.get("temporal_patch_size", 2),
                       merge_size=vc.get("spatial_merge_size", 2), window_size=vc.get("window_size", 112),
                       fullatt_blocks=tuple(vc.get("fullatt_block_indexes", ())), in_channels=vc.get("in_channels", 3),
                       rope_theta=float(rope.get("rope_theta", 10000.0)))
        except KeyError as e:
            raise ModelLoadError(f"vision_config lacks {e.args[0]!r}: is this Qwen2.5-VL's vision tower?") from e


# --- the host side: window order, 2-D positions, cu_seqlens --------------------------------------------------

@dataclass(frozen=True, slots=True)
class VisionLayout:
    """One batch's int32 inputs, in one buffer: [ order: N | positions: 3 x N | cu_windows: W+1 | cu_images: F+1 |
    restore: U ]. order: the patch rows in window order; positions rows (unused, row, column) per patch in window
    order; restore: for output row u (image order), its row in window order."""

    n_patches: int
    n_windows: int
    n_frames: int
    max_window: int  # host ints: the attention grids' sizes
    max_frame: int
    buf: np.ndarray

    def views(self, dev: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        N, W, Fr = self.n_patches, self.n_windows, self.n_frames
        order = dev[:N]
        pos = dev[N:4 * N].view(3, N)
        cu_win = dev[4 * N:4 * N + W + 1]
        cu_img = dev[4 * N + W + 1:4 * N + W + Fr + 2]
        restore = dev[4 * N + W + Fr + 2:]
        return order, pos, cu_win, cu_img, restore


def vision_layout(grids: list[tuple[int, int, int]], args: VisionArgs) -> VisionLayout:
    """grids: (t, h, w) patches per image, h and w multiples of m. Window order as HF's get_vision_window_index:
    per image and frame, windows of window_units x window_units merge units in raster order (the last row and
    column of windows cut short), units in raster order within a window, each unit's m*m patches as they come."""
    m, ws, mm = args.merge_size, args.window_units, args.merge_size ** 2
    unit_order, win_lens, frame_lens, pos_h, pos_w = [], [], [], [], []
    base = 0
    for t, h, w in grids:
        assert h % m == 0 and w % m == 0, f"grid {h}x{w} is not a multiple of the merge size {m}"
        uh, uw = h // m, w // m
        tt, r, c = np.meshgrid(np.arange(t), np.arange(uh), np.arange(uw), indexing="ij")
        tt, r, c = tt.ravel(), r.ravel(), c.ravel()  # unit k = (tt, r, c) in raster order
        win = (tt * -(-uh // ws) + r // ws) * -(-uw // ws) + c // ws  # window id, raster order per frame
        order = np.lexsort((c % ws, r % ws, win))  # by window, then row, then column within it
        unit_order.append(order + base)
        win_lens.append(np.bincount(win) * mm)  # every window holds at least one unit
        frame_lens += [h * w] * t
        # patch (a, b) of unit (r, c) sits at row r*m + a, column c*m + b
        a, b = np.divmod(np.arange(mm), m)
        pos_h.append((r[order, None] * m + a).ravel())
        pos_w.append((c[order, None] * m + b).ravel())
        base += t * uh * uw
    units = np.concatenate(unit_order)  # [U] unit in window order -> its unit in image order
    U = units.shape[0]
    N = U * mm
    patch_order = (units[:, None] * mm + np.arange(mm)).ravel()  # [N]
    restore = np.empty(U, dtype=np.int64)
    restore[units] = np.arange(U)
    win_lens = np.concatenate(win_lens)
    buf = np.concatenate([
        patch_order, np.zeros(N, dtype=np.int64), np.concatenate(pos_h), np.concatenate(pos_w),
        [0], np.cumsum(win_lens), [0], np.cumsum(frame_lens), restore,
    ]).astype(np.int32)
    return VisionLayout(N, len(win_lens), len(frame_lens), int(win_lens.max()), max(frame_lens), buf)


# --- the model ---------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=True)  # the checkpoint's own fused qkv
        self.wo = nn.Linear(args.dim, args.dim, bias=True)
        self.scale = args.head_dim ** -0.5

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Tensor, cu: Tensor, max_len: int, ops: Ops) -> Tensor:
        # x: [N, D], positions: [3, N] -> [N, D]
        a = self.args
        qkv = F.linear(x, self.wqkv.weight, self.wqkv.bias)  # [N, 3D]
        # rows 1 and 2 of positions rotate the first and second half of each head's frequencies (section 0 empty)
        q, k, v = ops.qkv_rope(qkv, positions, inv_freq, (0, a.head_dim // 4, a.head_dim // 4), a.n_heads, a.n_heads)
        o = ops.bidirectional_attention(q, k, v, cu, max_len, self.scale)  # [N, H, Dh]
        return F.linear(o.reshape(x.shape[0], a.dim), self.wo.weight, self.wo.bias)


class FeedForward(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=True)  # gate rows first, then up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=True)

    def forward(self, x: Tensor, ops: Ops) -> Tensor:
        # x: [N, D] -> [N, 2I] -> [N, I] -> [N, D]; in row chunks so a big batch never holds all of [N, 2I]
        N, chunk = x.shape[0], ops.ffn_chunk_tokens
        if N <= chunk:
            return F.linear(ops.silu_mul(F.linear(x, self.w13.weight, self.w13.bias)), self.w2.weight, self.w2.bias)
        out = torch.empty_like(x)
        for s in range(0, N, chunk):
            act = ops.silu_mul(F.linear(x[s:s + chunk], self.w13.weight, self.w13.bias))  # [c, I]
            torch.addmm(self.w2.bias, act, self.w2.weight.t(), out=out[s:s + chunk])
        return out


class Block(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.norm1 = RMSNorm(args.dim)
        self.attn = Attention(args)
        self.norm2 = RMSNorm(args.dim)
        self.mlp = FeedForward(args)
        self.eps = args.norm_eps

    def forward(self, h: Tensor, residual: Tensor | None, positions: Tensor, inv_freq: Tensor, cu: Tensor,
                max_len: int, ops: Ops) -> tuple[Tensor, Tensor]:
        # h: the last sublayer's output [N, D]; residual: the stream before it [N, D] (None before block 0)
        if residual is None:
            residual = h
            x, _ = ops.rms_norm(h, self.norm1.weight, self.eps)
        else:
            x, residual = ops.rms_norm(h, self.norm1.weight, self.eps, residual)  # add + norm
        h = self.attn(x, positions, inv_freq, cu, max_len, ops)
        x, residual = ops.rms_norm(h, self.norm2.weight, self.eps, residual)  # add + norm
        return self.mlp(x, ops), residual


class Merger(nn.Module):
    """RMSNorm, then each merge unit's m*m patches side by side through Linear, GELU (erf), Linear."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.ln_q = RMSNorm(args.dim)
        self.w1 = nn.Linear(args.merged_dim, args.merged_dim, bias=True)
        self.w2 = nn.Linear(args.merged_dim, args.out_dim, bias=True)


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embed = nn.Linear(args.patch_dim, args.dim, bias=False)  # Conv3d, stride == kernel
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.depth))
        self.merger = Merger(args)
        self.inv_freq: Tensor | None = None  # [Dh/2] fp32, set by setup()
        self.ops: Ops | None = None
        self.staging: Staging | None = None

    def setup(self, device: torch.device, dtype: torch.dtype, options: KernelOptions = KernelOptions()) -> None:
        """After the weights are in place: the RoPE frequencies (as HF computes them, for rows and columns alike)
        and the op table."""
        a = self.args
        half = a.head_dim // 2
        inv = 1.0 / (a.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # [Dh/4]
        self.inv_freq = torch.cat((inv, inv)).to(device)  # [Dh/2]: row frequencies, then column ones
        self.ops = Ops(device, dtype, a.n_heads, a.n_heads, a.head_dim, options, causal_attention=False)
        self.staging = Staging(device)

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    @torch.inference_mode()
    def warmup(self) -> None:
        """Compiles the Triton kernels before the first image: token counts that are and are not multiples of 16
        (Triton specializes integer arguments on that)."""
        for grids in ([(1, 8, 8)], [(1, 2, 6)]):
            n = sum(t * h * w for t, h, w in grids)
            self(torch.zeros(n, self.args.patch_dim, device=self.device), grids)

    def forward(self, patches: Tensor, grids: list[tuple[int, int, int]]) -> Tensor:
        """patches: [N, C*Tp*P*P] (Qwen2-VL's processor layout: images in order, each image's patches merge unit
        by merge unit), any float dtype; grids: (t, h, w) patches per image. Returns [U, Do] in the model dtype,
        images in order, unit by unit (one row per image-pad token)."""
        a, ops = self.args, self.ops
        layout = vision_layout(grids, a)
        assert patches.shape == (layout.n_patches, a.patch_dim), (
            f"vision tower: patches {tuple(patches.shape)} for grids {grids}: want [{layout.n_patches}, {a.patch_dim}]")
        host = torch.from_numpy(layout.buf)
        staged = self.staging.acquire(host.numel())
        if staged is not None:
            host = staged[:host.numel()].copy_(host)
        order, pos, cu_win, cu_img, restore = layout.views(self.staging.to_device(host))
        w = self.patch_embed.weight
        x = patches.to(device=w.device, dtype=w.dtype, non_blocking=True).index_select(0, order)  # [N, C*Tp*P*P]
        h = F.linear(x, w)  # [N, D]
        full = set(a.fullatt_blocks)
        residual = None
        for i, blk in enumerate(self.blocks):
            cu, max_len = (cu_img, layout.max_frame) if i in full else (cu_win, layout.max_window)
            h, residual = blk(h, residual, pos, self.inv_freq, cu, max_len, ops)
        m = self.merger
        x, _ = ops.rms_norm(h, m.ln_q.weight, a.norm_eps, residual, store_residual=False)  # [N, D]
        x = x.view(-1, a.merged_dim)  # [U, m*m*D]: units stay whole in window order
        x = F.linear(F.gelu(F.linear(x, m.w1.weight, m.w1.bias)), m.w2.weight, m.w2.bias)  # [U, Do]
        return x.index_select(0, restore)


# --- loading -----------------------------------------------------------------------------------------------------

_FUSED = {"mlp.gate_proj.weight": ("mlp.w13.weight", 0), "mlp.up_proj.weight": ("mlp.w13.weight", 1),
          "mlp.gate_proj.bias": ("mlp.w13.bias", 0), "mlp.up_proj.bias": ("mlp.w13.bias", 1)}
_RENAMED = {"attn.qkv.weight": "attn.wqkv.weight", "attn.qkv.bias": "attn.wqkv.bias",
            "attn.proj.weight": "attn.wo.weight", "attn.proj.bias": "attn.wo.bias",
            "mlp.down_proj.weight": "mlp.w2.weight", "mlp.down_proj.bias": "mlp.w2.bias",
            "norm1.weight": "norm1.weight", "norm2.weight": "norm2.weight"}
_TOP = {"patch_embed.proj.weight": "patch_embed.weight", "merger.ln_q.weight": "merger.ln_q.weight",
        "merger.mlp.0.weight": "merger.w1.weight", "merger.mlp.0.bias": "merger.w1.bias",
        "merger.mlp.2.weight": "merger.w2.weight", "merger.mlp.2.bias": "merger.w2.bias"}


def load_state_dict(args: VisionArgs, text_encoder_dir: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Streams the `visual.*` tensors (mmap'ed) into device tensors: gate and up land in their fused buffer's
    rows, the Conv3d kernel is flattened to the GEMM's [D, C*Tp*P*P]. Checks every weight's presence and shape."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VisionTransformer(args).state_dict().items()}
    out: dict[str, Tensor] = {}
    filled: dict[str, set[int]] = {}
    for name, t in iter_tensors(text_encoder_dir, want=lambda n: n.startswith("visual.")):
        key = name[len("visual."):]
        part = None
        if key in _TOP:
            ours = _TOP[key]
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest in _FUSED:
                ours, part = _FUSED[rest]
            elif rest in _RENAMED:
                ours = _RENAMED[rest]
            else:
                raise ModelLoadError(f"unexpected vision weight {name!r} in {text_encoder_dir}")
            ours = f"blocks.{idx}.{ours}"
        else:
            raise ModelLoadError(f"unexpected vision weight {name!r} in {text_encoder_dir}")
        if ours not in shapes:
            raise ModelLoadError(f"{name!r} does not fit a vision tower of depth {args.depth}")
        want = shapes[ours]
        if part is None:
            if ours == "patch_embed.weight" and t.dim() == 5:
                t = t.reshape(t.shape[0], -1)  # [D, C, Tp, P, P] -> [D, C*Tp*P*P], the order of a flat patch
            if tuple(t.shape) != want:
                raise ModelLoadError(f"{name!r} has shape {tuple(t.shape)}, the vision config says {want}")
            out[ours] = t.to(device=device, dtype=dtype)
            filled[ours] = {0}
            continue
        n = want[0] // 2
        if tuple(t.shape) != (n,) + want[1:]:
            raise ModelLoadError(f"{name!r} has shape {tuple(t.shape)}, the vision config says {(n,) + want[1:]}")
        buf = out.get(ours)
        if buf is None:
            buf = out[ours] = torch.empty(want, device=device, dtype=dtype)
        buf[part * n:(part + 1) * n].copy_(t)
        filled.setdefault(ours, set()).add(part)
    missing = [k for k in shapes if len(filled.get(k, ())) != (2 if ".w13." in k else 1)]
    if missing:
        raise ModelLoadError(f"{text_encoder_dir} lacks vision weights for {missing[:4]} ({len(missing)} in all)")
    return out


def has_vision_weights(text_encoder_dir: str) -> bool:
    """Whether the checkpoint holds a vision tower (reads the safetensors headers only)."""
    from safetensors import safe_open

    for path in safetensors_files(text_encoder_dir):
        with safe_open(path, framework="pt") as f:
            if any((canonical_name(n) or "").startswith("visual.") for n in f.keys()):
                return True
    return False


def load_vision(text_encoder_dir: str, raw_config: dict, device: torch.device, dtype: torch.dtype,
                options: KernelOptions = KernelOptions()) -> VisionTransformer:
    """The tower of `raw_config["vision_config"]` with the checkpoint's `visual.*` (or `model.visual.*`) weights."""
    vc = raw_config.get("vision_config") or {}
    if not vc:
        raise ModelLoadError(f"{text_encoder_dir}/config.json has no vision_config: no vision tower to load")
    args = VisionArgs.from_config(vc)
    with torch.device("meta"):
        model = VisionTransformer(args)
    model.load_state_dict(load_state_dict(args, text_encoder_dir, device, dtype), strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.setup(device, dtype, options)
    return model


def parameters_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

