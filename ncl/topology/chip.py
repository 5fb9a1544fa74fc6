"""A chip type: what one accelerator can compute and stream, and what it draws, each figure sourced.

An operator on a chip takes max(FLOPs / achievable compute, bytes / achievable bandwidth) plus a
fixed cost (a roofline with achievable fractions, as LLMCompass and Vidur model operators).  The
achievable fractions are the only fitted numbers: each chip type may fix them from one named
published point (`calibrated_from`); everything else is a datasheet figure.

Precisions name what the weights are stored in (bf16, fp16, fp8, int8, mxfp4, int4).  A chip
without native compute at a precision runs it at the first precision of PRECISION_FALLBACK it has
(MXFP4 weights on an H100 are dequantized into bf16 matmuls, as vLLM's Marlin kernels do).
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

# bytes per weight as stored: MXFP4 is 4 bits plus one 8-bit e8m0 scale per block of 32 (OCP MX v1.0);
# int4 as GPTQ/AWQ store it, 4 bits plus a 16-bit scale per group of 128
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "mxfp4": 0.5 + 1 / 32,
                "int4": 0.5 + 2 / 128}
PRECISION_FALLBACK = {"mxfp4": ("mxfp4", "fp4", "bf16", "fp16"), "int4": ("int4", "bf16", "fp16"),
                      "fp8": ("fp8", "bf16", "fp16"), "int8": ("int8", "bf16", "fp16"),
                      "bf16": ("bf16", "fp16"), "fp16": ("fp16", "bf16"), "fp32": ("fp32", "bf16")}
# fields a chip type may give; the performance fields need a source each (schema.py checks)
NUMBER_FIELDS = ("memory_gib", "memory_bandwidth_gbps", "sram_mib", "tdp_w", "idle_w", "compute_efficiency",
                 "memory_efficiency", "kernel_overhead_us")
FIELDS = NUMBER_FIELDS + ("compute_tflops", "sources", "calibrated_from", "calibrated_field")
CALIBRATED_FIELDS = ("compute_efficiency", "memory_efficiency")


@dataclass(frozen=True)
class ChipType:
    name: str
    memory_gib: float
    memory_bandwidth_gbps: float                  # peak, GB/s
    compute_tflops: Dict[str, float]              # dense peak per precision
    sram_mib: Optional[float] = None              # on-chip SRAM (L2 on GPUs)
    tdp_w: Optional[float] = None
    idle_w: Optional[float] = None
    compute_efficiency: float = 1.0               # achievable share of peak compute on large matmuls
    memory_efficiency: float = 1.0                # achievable share of peak bandwidth streaming weights
    kernel_overhead_us: float = 0.0               # fixed cost of one operator (launch, synchronisation)
    sources: Dict[str, str] = field(default_factory=dict)
    calibrated_from: Optional[str] = None         # the published point that fixed one efficiency ...
    calibrated_field: Optional[str] = None        # ... this one (ncl-bench validate --calibrate)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2 ** 30

    def compute_precision(self, precision: str) -> str:
        """The precision this chip's matmuls run at for weights stored in `precision`."""
        for p in PRECISION_FALLBACK.get(precision, (precision,)):
            if p in self.compute_tflops:
                return p
        raise ValueError(f"chip type {self.name!r} has no compute rate for {precision} (nor a fallback: "
                         f"{', '.join(PRECISION_FALLBACK.get(precision, ()))}); it gives "
                         f"{', '.join(self.compute_tflops) or 'none'}")

    def peak_flops(self, precision: str) -> float:
        return self.compute_tflops[self.compute_precision(precision)] * 1e12

    def flops(self, precision: str) -> float:
        """Achievable FLOP/s for matmuls on weights stored in `precision`."""
        return self.peak_flops(precision) * self.compute_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable memory bytes/s."""
        return self.memory_bandwidth_gbps * 1e9 * self.memory_efficiency

    def op_seconds(self, flops: float, nbytes: float, precision: str) -> float:
        """One operator: the slower of its compute and its memory traffic, plus the fixed cost."""
        return max(flops / self.flops(precision), nbytes / self.bandwidth) + self.kernel_overhead_us * 1e-6

    def power_w(self, utilization: float) -> float:
        """Draw at a utilization in [0, 1] (the busier of compute and memory): idle to TDP, linearly."""
        if self.tdp_w is None:
            raise ValueError(f"chip type {self.name!r} gives no tdp_w")
        idle = self.idle_w if self.idle_w is not None else 0.0
        return idle + (self.tdp_w - idle) * min(1.0, max(0.0, utilization))
