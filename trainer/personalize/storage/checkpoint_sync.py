"""Mirror the resumable checkpoints to `<output.uri>/checkpoints/`, so a pod rescheduled onto
another node (its emptyDir output gone) resumes from the store.

- `push(path)` after each local save: the checkpoint's files, `manifest.json` last (a remote
  checkpoint without it is ignored, as locally), then the older remote checkpoints are deleted.
  A failed push is logged and training goes on: the local checkpoint is intact, the next save
  pushes again.
- `pull(directory)` before resuming, only when the local folder has no finished checkpoint:
  the newest remote one is downloaded into a temporary folder and renamed into place under its
  own name; the loader then verifies every file against the manifest's sha256.
- `remove()` once the artifacts and result.json are uploaded.

Remote names are never used as local paths beyond the `checkpoint-NNNNNN` pattern and the
manifest's plain file names.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Optional

from personalize.checkpoint import MANIFEST_FILE, list_checkpoints
from personalize.errors import TrainerInputError
from personalize.spec import PersonalizationJobSpec
from personalize.storage.locations import Location, StorageUnavailable, open_location, with_retries

log = logging.getLogger("personalize.storage")

REMOTE_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d{6,})$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointSync:
    def __init__(self, location: Location):
        self.location = location
        self.root = location.child(REMOTE_DIR)

    @classmethod
    def for_job(cls, spec: PersonalizationJobSpec) -> Optional["CheckpointSync"]:
        if not spec.output.uri:
            return None
        return cls(open_location(spec.output.uri, "output.uri"))

    def _remote_checkpoints(self) -> list[tuple[int, str]]:
        """(number, remote path) of finished remote checkpoints (with a manifest), newest first."""
        fs = self.location.fs
        found = with_retries("list", lambda: fs.find(self.root), where=self.location.uri_of(self.root))
        finished = []
        for path in found:
            parts = path[len(self.root) + 1:].split("/")
            if len(parts) == 2 and parts[1] == MANIFEST_FILE and _NAME.match(parts[0]):
                finished.append((int(_NAME.match(parts[0]).group(1)), f"{self.root}/{parts[0]}"))
        return sorted(finished, reverse=True)

    def push(self, checkpoint: Path) -> None:
        fs, started = self.location.fs, time.monotonic()
        target = f"{self.root}/{checkpoint.name}"
        try:
            names = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
            for name in [*names, MANIFEST_FILE]:
                local, remote = str(checkpoint / name), f"{target}/{name}"
                with_retries("upload", lambda: fs.put_file(local, remote), where=self.location.uri_of(remote))
            for _, old in self._remote_checkpoints():
                if old != target:
                    with_retries("delete", lambda: fs.rm(old, recursive=True), where=self.location.uri_of(old))
        except (StorageUnavailable, TrainerInputError) as err:
            log.warning("checkpoint %s not copied to %s (kept locally): %s", checkpoint.name, self.location.uri, err)
            return
        log.info("checkpoint %s copied to %s (%.3f s)", checkpoint.name, self.location.uri_of(target), time.monotonic() - started)

    def pull(self, directory: Path) -> Optional[Path]:
        """Download the newest remote checkpoint when `directory` has none; returns its local path."""
        if list_checkpoints(directory):
            return None
        remote = self._remote_checkpoints()
        if not remote:
            return None
        _, source = remote[0]
        fs, name = self.location.fs, source.rsplit("/", 1)[1]
        started = time.monotonic()
        manifest_bytes = with_retries("download", lambda: fs.cat_file(f"{source}/{MANIFEST_FILE}"),
                                      where=self.location.uri_of(source))
        manifest = json.loads(manifest_bytes)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-pull-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for file_name in sorted(manifest.get("files", {})):
                if not _FILE_NAME.match(file_name) or file_name in (".", ".."):
                    raise TrainerInputError(f"remote checkpoint {self.location.uri_of(source)}: unexpected file name {file_name!r}")
                remote_file = f"{source}/{file_name}"
                with_retries("download", lambda: fs.get_file(remote_file, str(tmp / file_name)),
                             where=self.location.uri_of(remote_file))
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
            final = directory / name
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("checkpoint %s restored from %s (%.3f s)", name, self.location.uri_of(source), time.monotonic() - started)
        return final

    def remove(self) -> None:
        fs = self.location.fs
        try:
            if with_retries("list", lambda: fs.find(self.root), where=self.location.uri_of(self.root)):
                with_retries("delete", lambda: fs.rm(self.root, recursive=True), where=self.location.uri_of(self.root))
        except (StorageUnavailable, TrainerInputError) as err:
            log.warning("old checkpoints under %s not deleted: %s", self.location.uri_of(self.root), err)
