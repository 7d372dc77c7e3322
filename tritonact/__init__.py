"""tritonact: train CNNs with an exact forward pass and k-bit activations for the backward pass."""

from tritonact.approx import ApproxReport, NoUnitRan, approximate
from tritonact.config import ApproxConfig
from tritonact.memory import SavedTensorCounter, activation_bytes_per_sample, peak_memory
from tritonact.quant import PackedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = [
    # training
    "approximate",
    "ApproxConfig",
    "ApproxReport",
    "NoUnitRan",
    # quantizer
    "PackedTensor",
    "quantize",
    "dequantize",
    # memory
    "SavedTensorCounter",
    "activation_bytes_per_sample",
    "peak_memory",
]
