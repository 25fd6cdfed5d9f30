// Smoke op for the extension build: the number of OpenMP threads the kernels would use.
#include <torch/library.h>
#include <ATen/Parallel.h>

static int64_t threads() { return at::get_num_threads(); }

TORCH_LIBRARY_FRAGMENT(tokenmill, m) { m.def("threads() -> int", threads); }
