"""What the device can do fast. Contract: `auto_dtype(device)` is bf16 on CUDA and on CPUs with native
bf16 matmuls (AVX512-BF16 / AMX, ~2.5x fp32 on these machines), else fp32."""
from __future__ import annotations

import torch


def auto_dtype(device: str | torch.device) -> torch.dtype:
    if str(device).startswith("cuda"):
        return torch.bfloat16
    cpu = torch.cpu
    fast = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported",
                                                                                 lambda: False)()
    return torch.bfloat16 if fast else torch.float32
