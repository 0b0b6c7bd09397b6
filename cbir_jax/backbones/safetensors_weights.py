"""Hugging Face `model.safetensors` checkpoints: found (or fetched once), read without PyTorch, hashed.

Why safetensors: the official DINOv2, CLIP and SigLIP checkpoints are published in it, and it is a JSON
header plus raw arrays, so reading it needs neither torch nor pickle. Where the file comes from:
`backbone.weights=PATH` (a local file), else the copy fetched earlier into `<cache_dir>/huggingface`, else
(with `huggingface_hub` installed and the internet reachable) one download of the pinned repo and revision.
When none of these works the error is one line that says where to put the file and how to fetch it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from cbir_jax.core.config import default_cache_dir
from cbir_jax.core.errors import ConfigError, MissingFileError, UserError

FILENAME = "model.safetensors"


class WeightsFileError(UserError):
    """A weights file that is not a readable safetensors checkpoint (truncated, another format)."""


def how_to_fetch(repo: str, revision: str) -> str:
    """The one command that puts the official checkpoint on disk, for error messages and the README."""
    return (f"hf download {repo} {FILENAME} --revision {revision} --local-dir DIR "
            f"(pip install huggingface-hub) and pass backbone.weights=DIR/{FILENAME}")


def _hub_cache(cache_dir: str | None) -> Path:
    return Path(os.path.expanduser(cache_dir or default_cache_dir())) / "huggingface"


def hub_download(repo: str, revision: str, cache_dir: str | None) -> str:
    """One download of `repo@revision`'s model.safetensors into `<cache_dir>/huggingface` (then reused)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo, filename=FILENAME, revision=revision, cache_dir=str(_hub_cache(cache_dir)))


def _cached_copy(repo: str, revision: str, cache_dir: str | None) -> str | None:
    """The file fetched earlier, found offline (huggingface_hub's cache layout), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id=repo, filename=FILENAME, revision=revision,
                                   cache_dir=str(_hub_cache(cache_dir)))
    return found if isinstance(found, str) and os.path.isfile(found) else None


def resolve(weights: str | None, repo: str, revision: str, cache_dir: str | None, *, what: str,
            download: Callable[[str, str, str | None], str] | None = None) -> str:
    """The local checkpoint path for a backbone; fetches it once when no path is given and none is cached.

    Offline (HF_HUB_OFFLINE=1, no `huggingface_hub`, or no network) a missing file is a one-line error.
    """
    if weights:
        path = os.path.expanduser(weights)
        if not os.path.isfile(path):
            raise MissingFileError(f"backbone.weights={weights} does not exist; get {what} with: {how_to_fetch(repo, revision)}")
        return path
    cached = _cached_copy(repo, revision, cache_dir)
    if cached:
        return cached
    where = f"{_hub_cache(cache_dir)} (backbone.hf_repo={repo}, backbone.hf_revision={revision})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise MissingFileError(f"no {what} checkpoint in {where} and HF_HUB_OFFLINE is set; "
                               f"get it with: {how_to_fetch(repo, revision)}")
    try:
        from huggingface_hub.errors import HFValidationError
    except ImportError:
        HFValidationError = ()  # noqa: N806  (without huggingface_hub the download below fails on import)
    try:
        path = (download or hub_download)(repo, revision, cache_dir)
    except HFValidationError as e:  # a malformed repo id or revision: the config's value, not a bug
        raise ConfigError(f"backbone.hf_repo={repo} / backbone.hf_revision={revision}: {e}") from None
    except ImportError:
        raise MissingFileError(f"no {what} checkpoint in {where} and huggingface_hub is not installed to fetch it; "
                               f"get it with: {how_to_fetch(repo, revision)}") from None
    except OSError as e:  # huggingface_hub's network and missing-entry errors are OSErrors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MissingFileError(f"no {what} checkpoint in {where} and fetching it failed ({first}); "
                               f"get it with: {how_to_fetch(repo, revision)}") from None
    return path


def load(path: str, rename: Callable[[str], str | None] = lambda key: key) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as numpy arrays (bf16 and f16 widened to float32), under the names
    `rename` gives them; keys it maps to None are never read (e.g. the text tower of a CLIP checkpoint)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(path, framework="numpy") as f:
            narrow: dict[str, str] = {}
            seen: dict[str, str] = {}
            for key in f.keys():
                name = rename(key)
                if name is None:
                    continue
                if name in seen:
                    raise WeightsFileError(f"backbone.weights={path} holds {name} twice (as {seen[name]} and {key})")
                seen[name] = key
                if f.get_slice(key).get_dtype() == "BF16":
                    narrow[key] = name  # numpy has no bfloat16: read below through JAX (ml_dtypes)
                else:
                    a = f.get_tensor(key)
                    out[name] = a.astype(np.float32) if a.dtype == np.float16 else a
        if narrow:
            with safe_open(path, framework="flax") as f:
                for key, name in narrow.items():
                    out[name] = np.asarray(f.get_tensor(key)).astype(np.float32)
    except SafetensorError as e:
        raise WeightsFileError(f"backbone.weights={path} is not a readable safetensors file ({e})") from None
    return out
