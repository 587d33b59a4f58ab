"""Model ids and paths -> a local checkpoint directory. The only module that knows the Hugging Face Hub.

Contract: `resolve_model(model, revision=None, files=MODEL_FILES) -> Path`.
- An existing directory is used as it is.
- A hub id (`org/name`, e.g. `google/diffusiongemma-26B-A4B-it`) is resolved by huggingface_hub's
  `snapshot_download`, with everything that implies: its cache (`HF_HUB_CACHE`, else under
  `HF_HOME`), shared with transformers and vLLM; `revision` (branch, tag or commit); `HF_TOKEN` for
  gated or private repositories; its download progress bars. Only the files blockdiff reads are
  fetched (`files`): `METADATA_FILES` are the small ones, so a caller can check a checkpoint
  (config, memory needed) before downloading tens of GB of weights.
- With `HF_HUB_OFFLINE=1` nothing is downloaded: the cached snapshot is used, or the error says
  that the model is not in the cache.
Errors are `FileNotFoundError` (no such directory, id, revision, or not cached while offline) or
`OSError` (network, access), each one line naming the model. The environment is read at each call.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja")
METADATA_FILES = ("*.json", "*.jinja")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(model: str | Path) -> bool:
    return isinstance(model, str) and HUB_ID.fullmatch(model) is not None and ".." not in model


def resolve_model(model: str | Path, revision: str | None = None, files: tuple[str, ...] = MODEL_FILES) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision applies to hub ids, not to the local directory {model}")
        return path
    if not is_hub_id(model):
        raise FileNotFoundError(f"model directory {model} does not exist (and it is not a hub id 'org/name')")
    return _download(str(model), revision, files)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _download(repo_id: str, revision: str | None, files: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    name = repo_id + (f" (revision {revision})" if revision else "")
    cache = os.environ.get("HF_HUB_CACHE") or None      # None: huggingface_hub's own default
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=list(files),
                                      local_files_only=offline(), library_name="blockdiff"))
    except IncompleteSnapshotError:
        raise FileNotFoundError(f"the cached copy of {name} is incomplete; download it again with network "
                                "access") from None
    except LocalEntryNotFoundError:
        if offline():
            raise FileNotFoundError(f"{name} is not a local directory, not in the Hugging Face cache "
                                    f"({_cache_dir(cache)}), and HF_HUB_OFFLINE=1 forbids downloading it") from None
        raise OSError(f"{name} could not be downloaded and is not in the Hugging Face cache "
                      f"({_cache_dir(cache)}): is the network reachable?") from None
    except GatedRepoError:
        raise OSError(f"{name} is gated: accept its license on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{name}: no such revision on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no model {repo_id} on the Hugging Face Hub (a private one needs HF_TOKEN)") from None
    except HfHubHTTPError as err:
        raise OSError(f"{name}: the Hugging Face Hub answered {err}".splitlines()[0]) from None


def _cache_dir(cache: str | None) -> str:
    from huggingface_hub import constants

    return cache or constants.HF_HUB_CACHE
