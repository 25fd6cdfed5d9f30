"""Launch configs of gpu_matvec.py per (rows bucket, N, padded K, bits, group), measured by
benchmarks/bench_gpu_kernels.py --write (empty: the rule in gpu_matvec.config)."""

TABLE = {}
