"""What the device can do fast. Contract: `auto_dtype(device)` is bf16 on CUDA and on CPUs with native
bf16 matmuls (AVX512-BF16 / AMX), else fp32 (AVX2-only CPUs run bf16 matmuls on slow fallback kernels). `--threads` for the
commands that run a model. `reuse_freed_memory()` keeps glibc from handing large freed tensors back
to the OS. torch is imported lazily, so that `--help` stays instant."""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_reusing = False


def auto_dtype(device):
    """-> torch.dtype"""
    import torch

    if str(device).startswith("cuda"):
        return torch.bfloat16
    cpu = torch.cpu
    fast = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported",
                                                                                 lambda: False)()
    return torch.bfloat16 if fast else torch.float32


def add_threads_flag(parser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for tensor ops (default: torch's choice, one per physical core)")


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads for this process (None keeps torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError("--threads must be >= 1")
        import torch

        torch.set_num_threads(threads)


def reuse_freed_memory() -> bool:
    """Make freed CPU tensors' memory reusable by the next allocation, process-wide (glibc only).

    By default glibc serves blocks over 128 KB-32 MB with mmap and returns them to the OS on free,
    so every new large tensor (logits tiles, attention scores) page-faults on fresh zeroed pages,
    which can cost more than the arithmetic written into them. Raising the mmap and trim thresholds
    keeps freed blocks in the heap (the process keeps its peak footprint, as with jemalloc or
    tcmalloc, which PyTorch recommends for CPU inference). Returns whether it took effect."""
    global _reusing
    if _reusing or not sys.platform.startswith("linux"):
        return _reusing
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _reusing = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _reusing
