"""C++ CPU kernels (csrc/, built once per machine by extension.py): quantized linears (linear.py) and decode attention
(attention.py); the sampler's passes live in csrc/sampler.cpp."""
