"""Triton GPU kernels: quantized products (matvec.py, quant_linear.py), fused norms / RoPE / SiLU (fused.py), paged
decode attention (attention.py)."""
