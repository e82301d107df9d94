"""Accelerators the planner knows: memory per device and peak throughput.

Imported on the login node: stdlib only. ``conf/cluster/*.yaml`` names a device by its key in ``DEVICES``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """One device as a training rank sees it (an MI250X GCD, not the whole module)."""

    name: str
    memory_bytes: int
    # Dense (no sparsity) peak, the denominator of MFU.
    peak_bf16_tflops: float
    peak_fp32_tflops: float | None = None  # vector FP32, no TF32 / matrix cores
    description: str = ""

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"device {self.name!r}: memory_bytes must be positive, got {self.memory_bytes}")
        if self.peak_bf16_tflops <= 0:
            raise ValueError(f"device {self.name!r}: peak_bf16_tflops must be positive, got {self.peak_bf16_tflops}")


# Memory is the nominal HBM size in GiB as the runtime reports it (nvidia-smi / rocm-smi); the runtime and
# driver keep a little of it, which the planner's margin absorbs.
DEVICES: dict[str, Device] = {
    "a100_64gb": Device(
        "a100_64gb", 64 * GIB, 312.0, 19.5, "NVIDIA A100 SXM 64 GB HBM2e (Leonardo Booster, 4 per node)"
    ),
    "mi250x_gcd": Device(
        # MI250X: 383 TFLOP/s bf16 and 47.9 TFLOP/s fp32 vector per module of 2 GCDs.
        "mi250x_gcd", 64 * GIB, 191.5, 23.95, "AMD MI250X, one GCD of 64 GB HBM2e (LUMI-G, 8 per node)"
    ),
    "h100_80gb": Device("h100_80gb", 80 * GIB, 989.0, 67.0, "NVIDIA H100 SXM 80 GB (bf16 dense)"),
    # A CPU rank: memory is host RAM per rank, which depends on the node and the ranks per node, so this
    # nominal value is only a placeholder; pass memory_bytes to get_device() for a real plan.
    "cpu": Device("cpu", 256 * GIB, 1.0, 1.0, "CPU rank (nominal memory; override with memory_bytes)"),
}


def get_device(name: str, *, memory_bytes: int | None = None) -> Device:
    """The device called ``name``; ``memory_bytes`` overrides its memory (e.g. host RAM per CPU rank)."""
    try:
        device = DEVICES[name]
    except KeyError:
        allowed = ", ".join(sorted(DEVICES))
        raise ValueError(f"unknown device {name!r}; allowed: {allowed}") from None
    return device if memory_bytes is None else replace(device, memory_bytes=memory_bytes)


def planner_assumes_flash(device_name: str | None) -> bool:
    """THE memory plan's attention assumption: PyTorch SDPA takes the flash / memory-efficient kernels on every GPU
    device (the preflight's attention probe checks it there), the math path on CPU. No profile counts as a GPU."""
    return device_name != "cpu"
