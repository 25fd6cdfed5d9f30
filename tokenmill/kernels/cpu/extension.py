"""Our C++ CPU kernels (`tokenmill/kernels/cpu/csrc/*.cpp`), compiled once per machine with torch.utils.cpp_extension.

Each source is its own small extension (a broken or missing one never takes the others down) and registers its
operators with `TORCH_LIBRARY_FRAGMENT(tokenmill, m)`, so after `ops("quant_matmul")` they are `torch.ops.tokenmill.<op>`.
The build needs a C++ compiler, ninja and an AVX-512 (VNNI, BF16) CPU; where any is missing `ops()` returns None and
callers keep their PyTorch path (a CPU without AVX-512 is expected and quiet; a failed build is warned once). Whether
to use them at all is the caller's choice, made once at construction (`tokenmill.load(kernels="torch")`). Builds are
cached under ~/.cache/tokenmill/ext ($TOKENMILL_EXT_DIR).

A build holds an OS file lock (`flock`), which dies with its holder: cpp_extension's own lock is a file whose existence
is the lock, so a build killed mid-way left every later run waiting on it forever. Another process waits for a running
build (saying so on stderr) for at most BUILD_WAIT_S, then keeps the PyTorch paths with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import pathlib
import sys
import time
import warnings

import torch

CSRC = pathlib.Path(__file__).parent / "csrc"
# AVX-512 with VNNI (u8 x s8 dot products) and BF16; the kernels check nothing at run time, so `ops()` checks the CPU.
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16",
          "-mfma", "-mf16c"]
NEEDED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
BUILD_WAIT_S = 300.0  # a build takes 10-40 s; past this another process's build is taken to be stuck


def cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def unavailable_reason() -> str | None:
    """Why the extension can't be used on this CPU, or None."""
    missing = [f for f in NEEDED_CPU_FLAGS if f not in cpu_flags()]
    if missing:
        return f"CPU lacks {', '.join(missing)}"
    return None


@functools.cache
def ops(source: str):
    """`torch.ops.tokenmill` with `csrc/<source>.cpp` built and loaded, or None (a build failure warned once)."""
    if unavailable_reason() is not None:
        return None
    try:
        return _build(CSRC / f"{source}.cpp")
    except TimeoutError as exc:
        reason = str(exc)
    except Exception as exc:  # a missing compiler/ninja or a build error: keep the PyTorch path
        reason = f"build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
    warnings.warn(f"tokenmill C++ CPU kernel {source} not used ({reason}); falling back to PyTorch", stacklevel=2)
    return None


def _build(src: pathlib.Path, wait_s: float = BUILD_WAIT_S):
    from torch.utils import cpp_extension

    digest = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode() + src.read_bytes())
    for header in sorted(CSRC.glob("*.h")):  # shared by every source: any change rebuilds all
        digest.update(header.read_bytes())
    name = f"tokenmill_{src.stem}_{digest.hexdigest()[:12]}"
    build_dir = pathlib.Path(os.environ.get("TOKENMILL_EXT_DIR", pathlib.Path.home() / ".cache" / "tokenmill" / "ext"))
    build_dir = build_dir / name
    with build_lock(build_dir, f"the {src.stem} CPU kernel", wait_s):
        if sys.stderr.isatty() and not (build_dir / f"{name}.so").exists():  # first use here: say why it pauses
            print(f"tokenmill: compiling the {src.stem} CPU kernel (once per machine, ~10-40 s)", file=sys.stderr,
                  flush=True)
        cpp_extension.load(name=name, sources=[str(src)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                           verbose=os.environ.get("TOKENMILL_EXT_VERBOSE") == "1")
    return torch.ops.tokenmill


@contextlib.contextmanager
def build_lock(directory: pathlib.Path, what: str, wait_s: float):
    """Hold `directory`'s build lock (an flock on directory/build.lock, holding the holder's pid) for the block.
    Another holder is waited for, named on stderr, for at most `wait_s` seconds; then TimeoutError."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()  # empty for the instant between the holder's flock and its write
                if time.monotonic() >= deadline:
                    msg = f"waited {wait_s:g} s for process {pid or '?'} to finish building {what}"
                    raise TimeoutError(msg) from None
                if pid and not told:
                    print(f"tokenmill: building CPU kernels, waiting for process {pid} ({what})", file=sys.stderr,
                          flush=True)
                    told = True
                time.sleep(0.2)
        # cpp_extension's lock file is only ever live under ours: one here was left by a killed build
        (directory / "lock").unlink(missing_ok=True)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
