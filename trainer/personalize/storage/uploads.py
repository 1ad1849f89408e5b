"""Upload the output folder to `output.uri`: every artifact, then `result.json` last.

A reader that finds `<uri>/result.json` may trust that everything it lists is there: it is
uploaded only after every other file has been (up to 4 at a time before it); `checkpoints/` is not an
artifact (`checkpoint_sync.py` mirrors it separately) and the upload's own state file stays local.

Nothing is lost when the store fails. The trained files are already on the output volume; the
upload state `<output>/.upload-state.json` records the URI, the spec it belongs to and the
sha256 of each file already uploaded, after each file. A failed upload (after the retries of
`locations.with_retries`) leaves result.json saying where the artifacts are and what failed,
and the trainer exits 1; the Job's next pod finds the pending state (`pending_upload`) and
uploads what is missing instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from personalize.spec import PersonalizationJobSpec
from personalize.storage.locations import Location, StorageUnavailable, open_location, with_retries

log = logging.getLogger("personalize.storage")

FIELD = "output.uri"
RESULT_FILE = "result.json"
STATE_FILE = ".upload-state.json"
# ".saving": the scratch folder a method saves into before its files get their names (artifacts.py)
LOCAL_ONLY = ("checkpoints", STATE_FILE, ".write-test", ".saving")
PARALLEL_UPLOADS = 4


def spec_digest(spec: PersonalizationJobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_api(), sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_files(output: Path) -> list[str]:
    """Relative POSIX paths of the files to upload, sorted, result.json last (when present)."""
    files = []
    for path in output.rglob("*"):
        rel = path.relative_to(output).as_posix()
        if not path.is_file() or rel.split("/", 1)[0] in LOCAL_ONLY or path.name.endswith(".tmp"):
            continue
        files.append(rel)
    files.sort(key=lambda rel: (rel == RESULT_FILE, rel))
    return files


class OutputUpload:
    """The upload of one output folder to one URI, resumable across processes."""

    def __init__(self, location: Location, output: Path, digest: str):
        self.location, self.output, self.digest = location, output, digest
        self.state_path = output / STATE_FILE

    @classmethod
    def for_job(cls, spec: PersonalizationJobSpec, output: Path) -> Optional["OutputUpload"]:
        if not spec.output.uri:
            return None
        return cls(open_location(spec.output.uri, FIELD), output, spec_digest(spec))

    # ---- state ---------------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        if state.get("uri") != self.location.uri or state.get("spec") != self.digest:
            return {}  # another job's (or another destination's) upload: start over
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_name(f"{STATE_FILE}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.state_path)

    def pending(self) -> bool:
        """A finished run whose upload did not complete (result.json is here, the state says so)."""
        state = self._read_state()
        return bool(state) and not state.get("complete") and (self.output / RESULT_FILE).is_file()

    def begin(self) -> None:
        """Mark the upload as owed, before its first byte: a crash from here on is retried."""
        state = self._read_state() or {"uri": self.location.uri, "spec": self.digest, "uploaded": {}}
        state["complete"] = False
        self._write_state(state)

    # ---- transfer ------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Write and delete a probe object, so that denied credentials fail before training."""
        fs, probe = self.location.fs, self.location.child(f".write-test-{uuid.uuid4().hex[:8]}")
        where = f"{FIELD} {self.location.uri!r}"
        with_retries("write", lambda: fs.pipe_file(probe, b""), where=where)
        with_retries("delete", lambda: fs.rm_file(probe), where=where)

    def upload(self, before_result: Optional[Callable[[], None]] = None) -> list[str]:
        """Upload what is missing; `before_result()` runs before result.json goes (to rewrite it).

        Returns the uploaded relative paths. Raises StorageUnavailable (transient failures after
        retries) or TrainerInputError (denied), with the state saved up to the last good file.
        """
        location, fs = self.location, self.location.fs
        state = self._read_state() or {"uri": location.uri, "spec": self.digest, "uploaded": {}}
        state["complete"] = False
        remote_sizes = self._remote_sizes()
        todo = []
        for rel in artifact_files(self.output):
            local = self.output / rel
            digest = _sha256(local)
            if rel != RESULT_FILE and not (state["uploaded"].get(rel) == digest
                                           and remote_sizes.get(rel) == local.stat().st_size):
                todo.append((rel, digest))  # else: uploaded by an earlier attempt and still there
        sent: list[str] = []
        lock = threading.Lock()

        def put(rel: str, digest: str) -> None:
            target = location.child(rel)
            with_retries("upload", lambda: fs.put_file(str(self.output / rel), target), where=location.uri_of(target))
            with lock:  # recorded as soon as it is in the store
                state["uploaded"][rel] = digest
                self._write_state(state)
                sent.append(rel)

        # A few files at a time (the store's latency, not bandwidth, dominates small files); the
        # first failure stops the rest, and what finished is recorded.
        with ThreadPoolExecutor(max_workers=PARALLEL_UPLOADS) as pool:
            futures = [pool.submit(put, rel, digest) for rel, digest in todo]
            for future in futures:
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise future.exception()
        if before_result is not None:
            before_result()
        target = location.child(RESULT_FILE)
        with_retries("upload", lambda: fs.put_file(str(self.output / RESULT_FILE), target), where=location.uri_of(target))
        state["uploaded"][RESULT_FILE] = _sha256(self.output / RESULT_FILE)
        state["complete"] = True
        self._write_state(state)
        return [*sorted(sent), RESULT_FILE]

    def _remote_sizes(self) -> dict[str, int]:
        location = self.location
        found = with_retries("list", lambda: location.fs.find(location.root, detail=True), where=location.uri)
        prefix = location.root + "/"
        return {path[len(prefix):]: info.get("size") for path, info in found.items() if path.startswith(prefix)}


def describe_failure(err: BaseException, output: Path, uri: str) -> str:
    """The status message of a failed upload: where the artifacts are, what failed, what happens next."""
    reason = str(err) if isinstance(err, StorageUnavailable) else f"{type(err).__name__}: {err}"
    return (f"training finished; the artifacts are in {output} but the upload to {uri} failed ({reason}); "
            "the next attempt retries the upload, not the training")
