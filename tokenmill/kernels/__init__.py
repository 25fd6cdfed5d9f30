"""Our own kernels, each beside its PyTorch reference: cpu/ (C++ AVX-512 through torch.utils.cpp_extension) and gpu/
(Triton)."""
