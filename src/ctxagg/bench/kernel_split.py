"""Where a pass spends its time: in the dense multiply-accumulate kernels (convolutions, matmuls, fused attention:
oneDNN / MKL / cuDNN / cuBLAS calls) or in everything else (element-wise work, norms, quantize/dequantize, copies,
the optimiser, Python).

This bounds what a software switch can buy. On CPUs, inductor leaves convolutions and matmuls to those libraries
(extern kernels), so ``torch.compile`` can shrink only the *other* time: compiled training is at most
``eager total / eager kernel time`` faster than eager. A cheaper number format speeds up the kernels and
whatever it fuses: int8 is at most ``bf16 total / int8 kernel time`` faster than compiled bf16. `ctxagg bench
deploy` and `ctxagg bench train` print these ceilings next to the measured ratios.

Times are ``torch.profiler`` self times of one profiled pass (CPU: the calling thread's time, which includes
the intra-op worker threads' work it waits for; CUDA: device time), so they add up to the pass.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["MAC_KERNEL_MARKERS", "is_mac_kernel", "kernel_split", "ceiling"]

# substrings of the profiler names of dense MAC kernels: aten::mkldnn_convolution, aten::convolution_backward,
# onednn::qconv_pointwise, onednn::qlinear_pointwise, mkldnn::_linear_pointwise, mkl::_mkl_linear,
# aten::mm / addmm / bmm / baddbmm, aten::_scaled_dot_product_*; on CUDA the libraries' kernel names
MAC_KERNEL_MARKERS = ("convolution", "qconv", "qlinear", "linear_pointwise", "mkl_linear", "::mm", "addmm", "bmm",
                      "scaled_dot_product", "cudnn", "gemm", "xmma", "flash")


def is_mac_kernel(name: str) -> bool:
    """Whether a profiler event name is a dense multiply-accumulate kernel (see :data:`MAC_KERNEL_MARKERS`)."""
    lowered = name.lower()
    return any(marker in lowered for marker in MAC_KERNEL_MARKERS)


def kernel_split(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Run ``fn`` once under ``torch.profiler``: ``total_ms``, ``kernel_ms`` (dense MAC kernels) and ``other_ms``."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    total = kernel = 0.0
    for event in prof.key_averages():
        # CUDA: what the device ran; CPU: what the calling thread spent (an op's self time excludes its children)
        spent = event.self_device_time_total if cuda else event.self_cpu_time_total
        total += spent
        kernel += spent if is_mac_kernel(event.key) else 0.0
    return dict(total_ms=total / 1e3, kernel_ms=kernel / 1e3, other_ms=(total - kernel) / 1e3)


def ceiling(reference_total_ms: float, candidate_kernel_ms: float) -> float:
    """The largest speed-up over a reference pass (``reference_total_ms``) a candidate can reach if everything but
    its MAC kernels took no time at all."""
    return reference_total_ms / candidate_kernel_ms if candidate_kernel_ms > 0 else float("inf")
