"""`baseModel.hubId` (+ `revision`) -> a snapshot folder in the Hugging Face cache.

The cache is the standard one (`HF_HUB_CACHE`, else `$HF_HOME/hub`): in a cluster the operator
mounts a shared PVC at HF_HOME, so the first job downloads the weights and later jobs reuse them.
A revision already in the cache is used without any request to the hub (the snapshot is looked
up with `local_files_only` first), so it also loads with `HF_HUB_OFFLINE=1`. `revision` pins a
branch, tag or commit; without it the hub's `main` is resolved once and the commit it named is
logged.

Only safetensors weights are fetched and loaded: pickled checkpoints (`.bin`, `.pt`, `.ckpt`,
...) can run code when loaded, so they are skipped unless the job sets
`baseModel.allowPickleWeights: true`. Formats diffusers never loads here (Flax, ONNX, ...) are
not downloaded at all.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError

log = logging.getLogger("personalize.storage")

PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]
UNUSED_PATTERNS = ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.tflite", "*.ot", "*.gguf", "*.mlmodel"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
RETRIES = 3


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "huggingface")
    return Path(home) / "hub"


def offline() -> bool:
    return (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")


def _describe(hub_id: str, revision: Optional[str]) -> str:
    return f"baseModel.hubId {hub_id!r}" + (f" revision {revision!r}" if revision else "")


def resolve_snapshot(hub_id: str, revision: Optional[str], allow_pickle: bool = False) -> Path:
    """The local snapshot folder of `hub_id` at `revision` (downloaded once into the cache)."""
    return _resolve(hub_id, revision, allow_pickle, str(hub_cache_dir()), offline(), os.environ.get("HF_ENDPOINT"))


@functools.lru_cache(maxsize=8)
def _resolve(hub_id: str, revision: Optional[str], allow_pickle: bool, cache_dir: str, offline_only: bool,
             endpoint: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = _describe(hub_id, revision)
    kwargs = dict(repo_id=hub_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                  ignore_patterns=UNUSED_PATTERNS + ([] if allow_pickle else PICKLE_PATTERNS))
    try:
        folder = snapshot_download(local_files_only=True, **kwargs)
        log.info("%s: commit %s, found in the cache %s", what, Path(folder).name, cache_dir)
        return _checked(Path(folder), what, allow_pickle)
    except HFValidationError as err:
        raise TrainerInputError(f"{what} is not a valid hub id or revision: {_first_line(err)}") from None
    except LocalEntryNotFoundError:
        if offline_only:
            raise TrainerInputError(f"{what} is not in the cache {cache_dir} and HF_HUB_OFFLINE is set") from None
    for attempt in range(RETRIES + 1):
        started = time.monotonic()
        try:
            folder = snapshot_download(**kwargs)
            log.info("%s: commit %s, downloaded into %s (%.1f s)", what, Path(folder).name, cache_dir,
                     time.monotonic() - started)
            return _checked(Path(folder), what, allow_pickle)
        except RevisionNotFoundError:
            raise TrainerInputError(f"baseModel.revision {revision!r} does not exist in {hub_id!r}") from None
        except RepositoryNotFoundError:
            raise TrainerInputError(
                f"baseModel.hubId {hub_id!r} does not exist on the hub, or is private or gated "
                "(give the job an HF_TOKEN through baseModel.secretRef)"
            ) from None
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in (401, 403):
                raise TrainerInputError(f"{what}: access denied (check HF_TOKEN in the job's secretRef)") from None
            if status is not None and status < 500 and status != 429:
                raise TrainerInputError(f"{what}: the hub answered {status}") from None
            problem = err
        except (LocalEntryNotFoundError, OSError) as err:  # connection trouble: the hub may come back
            problem = err
        if attempt < RETRIES:
            log.warning("%s: download failed (%s), retrying", what, type(problem).__name__)
            time.sleep(2.0**attempt)
    raise RuntimeError(f"{what}: the hub could not be reached: {_first_line(problem)}")


def _checked(folder: Path, what: str, allow_pickle: bool) -> Path:
    """Every weighted component of the pipeline must have weights we may load."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise TrainerInputError(f"{what} is not a diffusers pipeline (no model_index.json)")
    try:
        components = json.loads(index.read_text())
    except ValueError:
        raise TrainerInputError(f"{what}: model_index.json is not valid JSON") from None
    for name, value in components.items():
        sub = folder / name
        if name.startswith("_") or not isinstance(value, list) or not sub.is_dir():
            continue
        weights = [p.name for p in sub.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)]
        if (sub / "config.json").is_file() and not any(w.endswith(".safetensors") for w in weights) and not allow_pickle:
            raise TrainerInputError(
                f"{what}: component {name!r} has no .safetensors weights; pickled weights (.bin) load only "
                "with baseModel.allowPickleWeights: true"
            )
    return folder


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
