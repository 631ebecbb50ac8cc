"""Analytic FLOP count of one adapt + predict call, and the device peaks the achieved rate is measured against.

Counted: convolutions and linear layers, 2 FLOPs per multiply-accumulate. Backward = 2x forward (input and weight
gradients) except the first layer, whose input gradient nobody needs (1x). Batch norm, ReLU, pooling, the loss and
the SGD update are elementwise and left out (a few percent for these models), so the achieved rate is a lower bound.
"""

from __future__ import annotations

import os
import platform

import torch

from models.functional import MLP_OMNIGLOT_HIDDEN, MLP_SINUSOID_HIDDEN
from models.runtime import allocator_state
from models.spec import ModelSpec

# fp32 without tensor cores (the benchmark turns TF32 off so every method computes the same fp32 function), TFLOP/s.
# Vendor data sheets; first match on the device name wins, so the specific names come before the generic ones.
PEAK_FP32_TFLOPS: list[tuple[str, float, str]] = [
    ("GH200", 67.0, "NVIDIA GH200 data sheet, FP32"),
    ("H200", 67.0, "NVIDIA H200 SXM data sheet, FP32"),
    ("H100 PCIe", 51.2, "NVIDIA H100 PCIe data sheet, FP32"),
    ("H100 NVL", 60.0, "NVIDIA H100 NVL data sheet, FP32"),
    ("H100", 67.0, "NVIDIA H100 SXM data sheet, FP32"),
    ("B200", 80.0, "NVIDIA B200 data sheet, FP32"),
    ("A100", 19.5, "NVIDIA A100 data sheet, FP32"),
    ("L40S", 91.6, "NVIDIA L40S data sheet, FP32"),
    ("L4", 30.3, "NVIDIA L4 data sheet, FP32"),
    ("A10", 31.2, "NVIDIA A10 data sheet, FP32"),
    ("RTX 4090", 82.6, "NVIDIA Ada whitepaper, RTX 4090 FP32"),
    ("V100", 15.7, "NVIDIA V100 SXM2 data sheet, FP32"),
    ("T4", 8.1, "NVIDIA T4 data sheet, FP32"),
]


def _layers(spec: ModelSpec) -> list[tuple[int, int]]:
    """Per layer and per example: (multiply-accumulates, weight count), in forward order."""
    layers = []
    if spec.arch.startswith("conv4"):
        c_in, side, h = spec.input_shape[0], spec.input_shape[1], spec.hidden
        omniglot = spec.arch == "conv4-omniglot"
        for i in range(4):
            c = c_in if i == 0 else h
            side = (side - 1) // 2 + 1 if omniglot else side  # 3x3, pad 1: stride 2 (omniglot) or 1
            layers.append((h * c * 9 * side * side, h * c * 9))
            if not omniglot:
                side //= 2  # max-pool 2
        features = h if omniglot else h * side * side
    else:
        hidden = MLP_OMNIGLOT_HIDDEN if spec.arch == "mlp-omniglot" else MLP_SINUSOID_HIDDEN
        features = 1
        for d in spec.input_shape:
            features *= d
        for f_out in hidden:
            layers.append((features * f_out, features * f_out))
            features = f_out
    layers.append((features * spec.ways, features * spec.ways))
    return layers


def forward_flops(spec: ModelSpec, examples: int) -> int:
    """FLOPs of one task's forward over `examples` inputs."""
    return 2 * examples * sum(macs for macs, _ in _layers(spec))


def adapt_predict_flops(spec: ModelSpec, support: int, queries: int, steps: int, bn_policy: str | None = None,
                        track: bool = False) -> int:
    """FLOPs per task of `steps` SGD steps on `support` examples, then predicting `queries` examples."""
    fwd = [2 * support * macs for macs, _ in _layers(spec)]
    bwd = 2 * sum(fwd) - fwd[0]  # the first layer needs no input gradient
    per_step = sum(fwd) + bwd
    policy = bn_policy or spec.bn_policy
    predict_rows = support + queries if policy == "support" and spec.arch != "mlp-sinusoid" else queries
    total = steps * per_step + forward_flops(spec, predict_rows)
    if track:
        total += sum(fwd)  # the support loss after the last step
    return total


def peak_for(device_name: str) -> tuple[float, str] | None:
    """(fp32 TFLOP/s, source) of the first table entry whose key is in the device name, or None."""
    name = device_name.lower()
    return next(((peak, src) for key, peak, src in PEAK_FP32_TFLOPS if key.lower() in name), None)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, peak_tflops: float | None = None) -> dict:
    """Name, versions, and the fp32 peak used for utilisation (None where no peak is known and none is given)."""
    info = {"type": device.type, "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # a box without triton still benchmarks the torch methods
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count)
    else:
        info.update(name=f"CPU: {cpu_name()}", threads=torch.get_num_threads(), cores=os.cpu_count(),
                    load_average=[round(x, 2) for x in os.getloadavg()],  # other processes skew CPU timings
                    allocator=allocator_state())
    if peak_tflops:
        info.update(peak_tflops=float(peak_tflops), peak_source="given on the command line (--peak-tflops)")
    elif device.type == "cuda":
        match = peak_for(info["name"])
        info.update(peak_tflops=match[0] if match else None,
                    peak_source=match[1] if match else f"no peak known for {info['name']!r}: pass --peak-tflops")
    else:
        info.update(peak_tflops=None, peak_source="CPU: no peak table (pass --peak-tflops to get % of peak)")
    return info
