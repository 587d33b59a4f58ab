import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Each tiny oracle config saved once by transformers: {name: (hf_model, directory)}."""
    from hf_oracle import CONFIGS, build_hf

    out = {}
    for name in CONFIGS:
        model = build_hf(name)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out
