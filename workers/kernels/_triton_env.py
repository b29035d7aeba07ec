"""Where the Triton kernels can run, and a stand-in so the torch references import without Triton.

CPU-only torch wheels ship without triton; the model code must still import `workers.kernels` there and use the
`*_ref` functions. `triton.jit` decides between compiled and interpreted kernels when the kernel modules are
imported, so TRITON_INTERPRET must be set before that (tests do it at the top of the module).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    class _MissingTriton:
        # Only what kernel definitions touch at import time: the decorator and the constexpr annotation.
        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << max(0, int(n) - 1).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _MissingLanguage:
        constexpr = object

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingLanguage()  # type: ignore[assignment]


def _interpret_requested() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Read once, when the kernel modules of this package are decorated: that is the moment triton.jit picks
# compiled or interpreted, so setting the variable later changes nothing for them.
INTERPRET: bool = HAS_TRITON and _interpret_requested()


def triton_available(device: torch.device | str | torch.Tensor) -> bool:
    """True when the launchers in this package can run on `device` (a device or a tensor on it)."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if not HAS_TRITON:
        return False
    if INTERPRET:
        return device.type in ("cpu", "cuda")  # the interpreter copies CUDA tensors to the host and back
    return device.type == "cuda"


def check_launchable(x: torch.Tensor, name: str) -> None:
    """Raise a clear error before a launch that would fail deep inside Triton."""
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: triton is not installed; call {name}_ref instead")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{name}: tensors are on {x.device} but the kernels were compiled for CUDA; set TRITON_INTERPRET=1 "
            f"before importing workers.kernels to run them on the CPU, or call {name}_ref"
        )
