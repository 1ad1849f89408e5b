"""The end of a job with `output.uri`: upload the artifacts, result.json last, and say in the
report where they are; or, when an earlier attempt trained but could not upload, only upload.

`finish_upload` runs after the local result.json is written. On success the report's
`artifact.location` becomes the URI (and so does result.json's, uploaded last). On failure it
stays the local folder and `message` says what failed; the caller exits 1 and the Job's next
pod calls `retry_pending_upload` (from the CLI, before any input check or model load), which
uploads what is missing and reports the finished run again, without training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from personalize.errors import TrainerInputError
from personalize.spec import PersonalizationJob, RunResult, TrainerReport
from personalize.storage.locations import StorageUnavailable
from personalize.storage.uploads import RESULT_FILE, OutputUpload, describe_failure

log = logging.getLogger("personalize.storage")


def finish_upload(upload: OutputUpload, report: TrainerReport, write_result: Callable[[], None],
                  after_success: Optional[Callable[[], None]] = None) -> bool:
    """Upload the output folder; True when everything (result.json last) is in the store."""
    upload.begin()
    local = str(upload.output)

    def point_at_the_store() -> None:
        if report.artifact is not None:
            report.artifact.location = upload.location.uri
        report.message = None
        write_result()

    try:
        sent = upload.upload(before_result=point_at_the_store)
    except (StorageUnavailable, TrainerInputError) as err:
        if report.artifact is not None:
            report.artifact.location = local
        report.message = describe_failure(err, upload.output, upload.location.uri)
        write_result()
        log.error("%s", report.message)
        return False
    log.info("uploaded %d file(s) to %s", len(sent), upload.location.uri)
    if after_success is not None:
        after_success()
    return True


def retry_pending_upload(job: PersonalizationJob, output: Path, write_json: Callable[[dict, Path], None],
                         environ: Optional[dict[str, str]] = None, termination_message: bool = True) -> Optional[int]:
    """Exit code of an upload-only attempt, or None when no upload is owed (then train as usual).

    `write_json(data, path)` writes result.json the way the trainer always does (atomically).
    `environ`: where the status reporter finds the job's resource (default: the process's);
    `termination_message`: whether the report is also the pod's (not for one member of a pack)."""
    upload = OutputUpload.for_job(job.spec, output)
    if upload is None or not upload.pending():
        return None
    log.info("training finished in an earlier attempt; retrying the upload to %s", upload.location.uri)
    # result.json holds the status fields plus how the run computed; the status gets the former.
    result = RunResult.model_validate(json.loads((output / RESULT_FILE).read_text()))
    report = TrainerReport(**{field: getattr(result, field) for field in TrainerReport.model_fields})

    from personalize.status_reporter import EXIT_STATUS_UNREPORTED, StatusReporter, StatusReportError
    from personalize.storage.checkpoint_sync import CheckpointSync
    from personalize.termination import write_termination_message

    try:
        reporter = StatusReporter.from_env(environ)
    except StatusReportError as err:
        raise TrainerInputError(str(err)) from None
    sync = CheckpointSync.for_job(job.spec)

    def write_result() -> None:
        whole = RunResult(**dict(report), mixed_precision=result.mixed_precision, processes=result.processes)
        write_json(whole.to_api(), output / RESULT_FILE)

    ok = finish_upload(upload, report, write_result, after_success=sync.remove if sync is not None else None)
    if termination_message:
        write_termination_message(report)
    if reporter is not None:
        try:
            reporter.report(report, final=True)
        except StatusReportError as err:
            log.error("final status patch failed (result.json and the termination message are written): %s", err)
            return EXIT_STATUS_UNREPORTED if ok else 1
        finally:
            reporter.close()
    return 0 if ok else 1
