"""What the device can do fast, and hold. Contract: `auto_dtype(device)` is bf16 on CUDA and on CPUs
with native bf16 matmuls (AVX512-BF16 / AMX), else fp32 (AVX2-only CPUs run bf16 matmuls on slow
fallback kernels). `--threads` for the commands that run a model. `reuse_freed_memory()` keeps glibc
from handing large freed tensors back to the OS; `release_freed_memory()` hands the free ones back now. `check_fits(nbytes, device)` raises
`NotEnoughMemory` when the device has less free memory than that (CUDA: the driver's free bytes;
CPU: MemAvailable). torch is imported lazily, so that `--help` stays instant."""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_reusing = False
LIGHT_SCHEMES = ("w8a8", "w4a16", "w4a16-experts")     # `blockdiff quantize --scheme ...`


class NotEnoughMemory(ValueError):
    """The weights would not fit in the device's free memory; the message says how much each needs."""


def free_memory_bytes(device) -> int | None:
    """Free memory of `device` in bytes, or None where it cannot be read."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def check_fits(nbytes: int, device, what: str) -> None:
    """Refuse before loading, not with an out-of-memory error halfway through a 50 GB load."""
    free = free_memory_bytes(device)
    if free is not None and nbytes > free:
        raise NotEnoughMemory(
            f"{what} need {nbytes / 1e9:.2f} GB on {device} and {free / 1e9:.2f} GB is free; load a light "
            f"(quantized) version instead (`blockdiff quantize --scheme {'|'.join(LIGHT_SCHEMES)}`), "
            "or use a device with more memory")


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


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS now (glibc `malloc_trim`): after a load that freed
    many mid-sized temporaries between the tensors it keeps, those holes would otherwise stay
    resident. Returns whether it ran."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def has_vnni() -> bool:
    """Whether the CPU has AVX512-VNNI (int8 dot products accumulate in int32 without saturating)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False
