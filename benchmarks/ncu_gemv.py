"""One call of each Llama-3-8B linear's one-row kernel (configs in use), for Nsight Compute:

    ncu --kernel-name regex:gemv --section SpeedOfLight --section WarpStateStats --section Occupancy \
        --section SchedulerStats python benchmarks/ncu_gemv.py
"""
import torch

from tokenmill.kernels.gpu.quant_linear import QuantLinear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}

with torch.inference_mode():
    for name, (n, k) in SHAPES.items():
        layer = QuantLinear.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02, 4, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            y = layer.product(x)
        torch.cuda.synchronize()
        print(name, tuple(y.shape), flush=True)
