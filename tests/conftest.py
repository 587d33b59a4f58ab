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


@pytest.fixture(scope="session")
def release_dir(tmp_path_factory):
    """The release-shaped tiny checkpoint (tests/release_fixture.py), built once per session."""
    from release_fixture import build_release_checkpoint

    return build_release_checkpoint(tmp_path_factory.mktemp("release") / "diffusiongemma-tiny")


@pytest.fixture
def hub_cache(release_dir, tmp_path, monkeypatch):
    """An offline Hugging Face cache holding the release fixture as google/diffusiongemma-tiny: the real
    resolution code runs against it (HF_HUB_CACHE, HF_HUB_OFFLINE=1)."""
    from release_fixture import install_in_hub_cache

    cache = tmp_path / "hf-cache"
    snapshot = install_in_hub_cache(release_dir, cache, "google/diffusiongemma-tiny")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, snapshot
