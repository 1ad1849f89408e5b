"""The on-disk format of resumable training checkpoints: what a restarted pod needs to continue
a run exactly where the preempted one stopped, written atomically and verified on reading.

What goes in is decided elsewhere: `trainable.py` names the trained tensors, `rng_state.py`
captures the random streams, `fingerprint.py` identifies the spec, and `resume.py` assembles a
`TrainingCheckpoint` from the objects that own the state.

A checkpoint is one directory under the checkpoint folder (the loop uses `<output>/checkpoints`):

    checkpoint-000004/          the 4th save into this folder (its step is in state.json/manifest)
        trainable.safetensors   what the method trains (LoRA adapters, embedding rows, UNet ...)
        rng.safetensors         torch CPU/CUDA RNG states and the loop's named torch.Generators
        optimizer.pt            {"optimizer": state_dict}; plain tensors/numbers only, so it
                                loads with weights_only=True
        state.json              step, stage, criterion states, reference batch, loss rows,
                                identifier tokens, python/numpy RNG states, extras
        spec.json               the spec the run was started with (names what differs on refusal)
        manifest.json           written last: format version, step, size and sha256 of every file

Atomicity: everything is written into a hidden `.tmp-...` directory next to the final one, each
file and the directory are fsynced, and only then is the directory renamed to `checkpoint-...`
(rename is atomic on POSIX file systems). A crash at any point leaves either the previous
checkpoints untouched plus an ignored `.tmp-` directory, or the new complete checkpoint. Older
checkpoints are removed only after the new one is in place, again by renaming them out of the
`checkpoint-` namespace before deleting them, so a resume never sees a half-deleted one either.
Checkpoints are numbered in save order; the newest is the one with the highest number.

Loading verifies sizes and checksums against the manifest. A corrupt checkpoint (bit rot, a
file truncated by a network file system) is skipped with a warning when an older complete one
exists, and otherwise reported as a `CheckpointCorruptError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from personalize.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from personalize.fingerprint import differing_fields
from personalize.rng_state import RngState

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainingCheckpoint",
    "save_checkpoint",
    "load_latest_checkpoint",
    "list_checkpoints",
]

log = logging.getLogger(__name__)

# Raised whenever the layout changes: a trainer then refuses a checkpoint it cannot read, with
# both versions in the message, instead of misreading it.
CHECKPOINT_FORMAT = 3

TRAINABLE_FILE = "trainable.safetensors"
RNG_FILE = "rng.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"

# checkpoint-<save number>. Checkpoints are ordered by the save number, not the step: a two-stage
# method restarts its step count in stage 2. The name is the number alone so that two writers
# picking the same number collide on the rename (and the second takes the next number).
_NAME_RE = re.compile(r"^checkpoint-(\d{6,})$")
_TMP_PREFIX = ".tmp-checkpoint-"
_TRASH_PREFIX = ".trash-checkpoint-"



# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)  # tensors have no single truth value: compare fields explicitly
class TrainingCheckpoint:
    """Everything a resumed run needs that cannot be rebuilt from the base model and the spec.

    `trainable` holds only what the method trains (plus anything trained in an earlier stage
    that later stages need, e.g. tiDreambooth's stage-1 embedding), on any device; it is saved
    from and loaded to the CPU. `rng` has one entry per data-parallel rank (index = rank).
    `criteria` maps a name of the loop's choosing ("policy", "stage1", ...) to a
    `StopPolicy.state_dict()` or `Criterion.state_dict()`. `loss_rows` are the rows of
    losses.csv so far. `extra` is any further JSON the run wants back (the finished stages,
    their files, which stage is in progress).
    """

    step: int
    spec_fingerprint: str
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    stage: Optional[str] = None
    rng: list[RngState] = field(default_factory=list)
    criteria: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The reference batch's own state (`ReferenceBatch.state_dict()`); its generator is one of
    # the named streams in `rng`.
    reference: dict[str, Any] = field(default_factory=dict)
    loss_rows: list[dict[str, Any]] = field(default_factory=list)
    identifier_tokens: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # The fingerprinted spec itself: lets a refusal name the fields that differ. Optional.
    spec: Optional[dict[str, Any]] = None
    # Set by load_latest_checkpoint: where this checkpoint was read from.
    path: Optional[Path] = None

    def check_spec(self, fingerprint: str, spec: Optional[dict[str, Any]] = None) -> None:
        """Raise CheckpointMismatchError unless this checkpoint was written for `fingerprint`."""
        if fingerprint == self.spec_fingerprint:
            return
        where = f"checkpoint {self.path}" if self.path else "the checkpoint"
        detail = ""
        if spec is not None and self.spec is not None:
            fields = differing_fields(self.spec, spec)
            if fields:
                shown = ", ".join(fields[:8]) + (" ..." if len(fields) > 8 else "")
                detail = f" (fields that differ: {shown})"
        raise CheckpointMismatchError(
            f"{where} was written for a different spec{detail}; restore the original spec to resume, "
            f"or delete the checkpoint folder to start over"
        )


# ---- writing -----------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some file systems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; safetensors refuses tensors sharing storage, so a
    tensor whose storage was already seen (tied weights) is cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def _write_files(tmp: Path, ckpt: TrainingCheckpoint) -> None:
    save_safetensors(_cpu_tensors(ckpt.trainable), str(tmp / TRAINABLE_FILE))

    rng_tensors: dict[str, torch.Tensor] = {}
    for rank, state in enumerate(ckpt.rng):
        rng_tensors.update(state.tensors(f"rank{rank}/"))
    save_safetensors(_cpu_tensors(rng_tensors), str(tmp / RNG_FILE))

    torch.save({"optimizer": ckpt.optimizer}, tmp / OPTIMIZER_FILE)

    _write_json(
        tmp / STATE_FILE,
        {
            "step": int(ckpt.step),
            "stage": ckpt.stage,
            "spec_fingerprint": ckpt.spec_fingerprint,
            "criteria": ckpt.criteria,
            "reference": ckpt.reference,
            "loss_rows": ckpt.loss_rows,
            "identifier_tokens": list(ckpt.identifier_tokens),
            "rng": [state.to_json() for state in ckpt.rng],
            "extra": ckpt.extra,
        },
    )
    if ckpt.spec is not None:
        _write_json(tmp / SPEC_FILE, ckpt.spec)


def _manifest(tmp: Path, step: int) -> dict[str, Any]:
    files = {}
    for p in sorted(tmp.iterdir()):
        _fsync_file(p)
        files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return {"format": CHECKPOINT_FORMAT, "step": int(step), "saved_at": time.time(), "files": files}


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    """(save number, path) of every `checkpoint-...` directory, finished or not."""
    found = []
    for p in directory.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return found


def list_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """Finished checkpoint directories (those with a manifest), newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return [p for _, p in sorted(_numbered(d), reverse=True) if (p / MANIFEST_FILE).is_file()]


def _rename_into_place(tmp: Path, directory: Path) -> Path:
    """Rename the finished temp dir to the next free save number; never onto an existing one
    (rename onto a non-empty directory fails, so a racing writer makes us take the next number)."""
    for _ in range(100):
        number = 1 + max((n for n, _ in _numbered(directory)), default=0)
        final = directory / f"checkpoint-{number:06d}"
        try:
            tmp.rename(final)
            return final
        except OSError:
            if not final.exists():
                raise
    raise CheckpointError(f"could not find a free checkpoint name in {directory}")


def _remove(path: Path) -> None:
    """Rename out of the checkpoint namespace first, then delete: never a half-deleted checkpoint."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# A temp dir younger than this may belong to a save still in progress: during a preemption the
# Job controller can start the replacement pod while the old one is still writing its SIGTERM
# checkpoint into the same volume.
LEFTOVER_AGE_SECONDS = 600.0


def _remove_leftovers(directory: Path) -> None:
    """Delete `.tmp-`/`.trash-` directories that a crashed save or cleanup left behind."""
    now = time.time()
    for p in directory.iterdir():
        if not (p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and p.is_dir()):
            continue
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if age > LEFTOVER_AGE_SECONDS:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(directory: Union[str, Path], ckpt: TrainingCheckpoint, keep: int = 1) -> Path:
    """Write `ckpt` atomically under `directory`; keep the newest `keep` checkpoints.

    Returns the new checkpoint's directory. Only the main process calls this (with every rank's
    RNG state in `ckpt.rng`). On any error the half-written temp directory is removed and the
    previous checkpoints are left as they were.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(d)

    started = time.monotonic()
    tmp = d / f"{_TMP_PREFIX}{ckpt.step:08d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, ckpt)
        manifest = _manifest(tmp, ckpt.step)
        _write_json(tmp / MANIFEST_FILE, manifest)
        _fsync_file(tmp / MANIFEST_FILE)
        _fsync_dir(tmp)
        final = _rename_into_place(tmp, d)
        _fsync_dir(d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    for old in list_checkpoints(d)[keep:]:
        _remove(old)
    _fsync_dir(d)
    size = sum(meta["size"] for meta in manifest["files"].values())
    log.info("checkpoint saved: %s (step %d, %d bytes, %.3f s)", final, ckpt.step, size, time.monotonic() - started)
    return final


# ---- reading -----------------------------------------------------------------------------


def _verify(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"checkpoint file {manifest_path} is unreadable: {err}") from None
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {manifest.get('format')!r}; this trainer reads format {CHECKPOINT_FORMAT}"
        )
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointCorruptError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CheckpointCorruptError(f"checkpoint file {f} has {size} bytes, expected {meta['size']} (truncated?)")
        if _sha256(f) != meta["sha256"]:
            raise CheckpointCorruptError(f"checkpoint file {f} fails its sha256 checksum (corrupt)")
    for required in (TRAINABLE_FILE, RNG_FILE, OPTIMIZER_FILE, STATE_FILE):
        if required not in files:
            raise CheckpointCorruptError(f"checkpoint file {path / required} is missing from the manifest")
    return manifest


def _read(path: Path) -> TrainingCheckpoint:
    _verify(path)

    def read_part(name: str, reader):
        try:
            return reader(path / name)
        except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
            raise CheckpointCorruptError(f"checkpoint file {path / name} cannot be read: {err}") from None

    trainable = read_part(TRAINABLE_FILE, lambda p: load_safetensors(str(p)))
    rng_tensors = read_part(RNG_FILE, lambda p: load_safetensors(str(p)))
    opt = read_part(OPTIMIZER_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    state = read_part(STATE_FILE, lambda p: json.loads(p.read_text()))
    spec = read_part(SPEC_FILE, lambda p: json.loads(p.read_text())) if (path / SPEC_FILE).is_file() else None

    try:
        rng = [RngState.from_parts(js, rng_tensors, f"rank{rank}/") for rank, js in enumerate(state["rng"])]
        return TrainingCheckpoint(
            step=int(state["step"]),
            stage=state["stage"],
            spec_fingerprint=state["spec_fingerprint"],
            trainable=trainable,
            optimizer=opt["optimizer"],
            rng=rng,
            criteria=state["criteria"],
            reference=state["reference"],
            loss_rows=state["loss_rows"],
            identifier_tokens=list(state["identifier_tokens"]),
            extra=state["extra"],
            spec=spec,
            path=path,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointCorruptError(f"checkpoint file {path / STATE_FILE} lacks a field or has a bad value: {err!r}") from None


def load_latest_checkpoint(
    directory: Union[str, Path],
    fingerprint: Optional[str] = None,
    spec: Optional[dict[str, Any]] = None,
) -> Optional[TrainingCheckpoint]:
    """The newest complete, intact checkpoint under `directory`, or None when there is none.

    A corrupt checkpoint is skipped (with a warning) in favour of an older intact one; when
    none is intact the newest one's `CheckpointCorruptError` (naming the file) is raised.
    With `fingerprint`, a checkpoint written for another spec raises `CheckpointMismatchError`
    (pass `spec=fingerprinted_spec(...)` too and the message names the differing fields).
    Tensors are returned on the CPU.
    """
    candidates = list_checkpoints(directory)
    first_error: Optional[CheckpointCorruptError] = None
    for path in candidates:
        try:
            ckpt = _read(path)
        except CheckpointCorruptError as err:
            log.warning("skipping unusable checkpoint: %s", err)
            first_error = first_error or err
            continue
        if first_error is not None:
            log.warning("resuming from the older checkpoint %s", path)
        if fingerprint is not None:
            ckpt.check_spec(fingerprint, spec)
        return ckpt
    if first_error is not None:
        raise first_error
    return None


