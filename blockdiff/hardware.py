"""What the device can do fast. Contract: `auto_dtype(device)` is bf16 on CUDA and on CPUs with native
bf16 matmuls (AVX512-BF16 / AMX, ~2.5x fp32 on these machines), else fp32. `--threads` for the
commands that run a model. torch is imported lazily, so that `--help` stays instant."""
from __future__ import annotations


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
