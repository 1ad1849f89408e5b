"""The pack runner: members join and leave one shared training loop (see pack_runner.py for the
command and its files). Each member is a `JobRunner` of its own (its outputs, report, status,
metrics and checkpoints) whose concept trains as one `Slot` of the shared `Pack`."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics_core import Metric

from personalize.artifacts import Snapshots
from personalize.errors import TrainerInputError
from personalize.identifier import Identifier
from personalize.job_runner import ConceptSetup, JobRunner, make_job_accelerator
from personalize.loop import Pack, train
from personalize.metrics import TrainerMetrics
from personalize.methods import METHODS
from personalize.pack_record import PACK_FILE, POLL_SECONDS, MemberRecord, PackRecord, read_manifests
from personalize.preflight import preflight
from personalize.reporting.trackers import Trackers
from personalize.run_files import RESULT_FILE, write_json
from personalize.shutdown import GracefulShutdown, TrainingInterrupted
from personalize.slot import Slot
from personalize.spec import EarlyStop, MixedPrecision, PersonalizationJob, SpecError, StopReason, TrainerReport, load_job
from personalize.status_reporter import StatusReporter, StatusReportError

log = logging.getLogger("personalize")

RECORD_SECONDS = 5.0  # pack.json is rewritten when a member comes or goes, and at least this often
# A member's series stay on /metrics this long after it left (`pack --metrics-linger`; the operator
# passes its trainer linger), so that scrapes see its last values; then they go, as a solo run's
# go with its pod.
METRICS_LINGER_SECONDS = 120.0


def solo_only(job: PersonalizationJob) -> Optional[str]:
    """Why this job cannot share a pack, or None."""
    spec = job.spec
    if not METHODS[spec.method.value].packable:
        return f"method {spec.method.value} trains the shared weights: it runs solo"
    if spec.resources.gpus > 1:
        return f"resources.gpus {spec.resources.gpus}: a data-parallel job runs solo"
    if spec.training.mixed_precision == MixedPrecision.fp16:
        return "mixedPrecision fp16: its loss scaler is one per process, so it runs solo (bf16 packs)"
    if spec.training.offload_text_encoders:
        return "training.offloadTextEncoders: moving the shared text encoders away runs solo"
    return None


@dataclass(frozen=True)
class PackKey:
    """What every member of a pack shares: the base model and how it runs."""

    base_model: str
    mixed_precision: str
    resolution: Optional[int]
    gradient_accumulation_steps: int
    gradient_checkpointing: bool

    @classmethod
    def of(cls, job: PersonalizationJob) -> "PackKey":
        spec = job.spec
        source = spec.base_model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"secret_ref"})
        return cls(json.dumps(source, sort_keys=True), spec.training.mixed_precision.value, spec.training.resolution,
                   spec.training.gradient_accumulation_steps, spec.training.gradient_checkpointing)

    def difference(self, other: "PackKey") -> Optional[str]:
        names = {"base_model": "baseModel", "mixed_precision": "training.mixedPrecision", "resolution": "training.resolution",
                 "gradient_accumulation_steps": "training.gradientAccumulationSteps",
                 "gradient_checkpointing": "training.gradientCheckpointing"}
        for attr, name in names.items():
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                def shown(value):
                    return "unset (the model's default)" if value is None else value
                return f"{name} {shown(theirs)} differs from the pack's {shown(mine)}"
        return None


class MergedRegistry:
    """One /metrics for the pack: the pack's own series and every member's, merged by family. A
    member that left is dropped `linger` seconds later."""

    def __init__(self, own: CollectorRegistry, linger: float = METRICS_LINGER_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.registries = [own]
        self.linger, self.clock = linger, clock
        self._until: dict[CollectorRegistry, float] = {}  # a departed member's registry -> when it goes
        # The training thread adds and retires; every scrape (a thread each) prunes and reads.
        self._lock = threading.Lock()

    def add(self, registry: CollectorRegistry) -> None:
        with self._lock:
            self.registries = [*self.registries, registry]

    def retire(self, registry: CollectorRegistry) -> None:
        with self._lock:
            self._until.setdefault(registry, self.clock() + self.linger)

    def collect(self):
        with self._lock:
            now = self.clock()
            gone = {r for r, until in self._until.items() if until <= now}
            if gone:
                self.registries = [r for r in self.registries if r not in gone]
                for registry in gone:
                    del self._until[registry]
            registries = self.registries
        families: dict[str, Metric] = {}
        for registry in registries:
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                merged.samples.extend(family.samples)
        return iter(families.values())


class Member:
    """One manifest of the pack while it trains."""

    def __init__(self, name: str, runner: JobRunner, setup: ConceptSetup, slot: Slot, printer):
        self.name, self.runner, self.setup, self.slot, self.printer = name, runner, setup, slot, printer


class PackRunner:
    def __init__(self, folder: Path, output: Path, max_slots: int = 8, idle_exit: float = 0.0,
                 metrics_port: Optional[int] = None, shutdown: Optional[GracefulShutdown] = None,
                 metrics_linger: float = METRICS_LINGER_SECONDS):
        self.folder, self.output, self.max_slots, self.idle_exit = folder, output, max_slots, idle_exit
        self.metrics_port, self.shutdown = metrics_port, shutdown
        output.mkdir(parents=True, exist_ok=True)
        self.record = PackRecord.load(output / PACK_FILE)
        self.record.max_slots = max_slots
        self.started = time.monotonic() - self.record.wall_seconds  # wall seconds over every attempt
        self.active: dict[str, Member] = {}
        self.key: Optional[PackKey] = None
        self.pack: Optional[Pack] = None
        self.models = self.resolution = self.accelerator = None
        self.routes = 0
        # New tokens of members that left: a shared tokenizer cannot drop a token, so a later
        # member that asks for one of them trains it again (its rows start afresh).
        self.released_tokens: set[str] = set()
        self._manifests: dict[Path, tuple[tuple, tuple]] = {}  # path -> (stat key, (job, error))
        self._written = 0.0  # when pack.json was last written
        self._between = 0.0  # seconds spent between steps (outputs, joins) in the current train()
        self.pod_namespace = os.environ.get("PJ_NAMESPACE")  # in a cluster: the only namespace served
        self.registry = CollectorRegistry()
        self.slots_gauge = Gauge("personalization_pack_slots", "Slots of the pack by state.", ["state"], registry=self.registry)
        self.concept_steps = Counter("personalization_pack_concept_steps", "Concept-steps trained by the pack.",
                                     registry=self.registry)
        self.metrics = MergedRegistry(self.registry, linger=metrics_linger)
        self._update_slot_gauges()

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        if self.metrics_port is not None:
            start_http_server(self.metrics_port, registry=self.metrics)
        idle_since = time.monotonic()
        try:
            while True:
                self.refresh()
                if self.pack is not None and self.pack.slots:
                    started = time.monotonic()
                    self._between = 0.0
                    train(self.pack, self.between_steps)
                    self.record.training_seconds += time.monotonic() - started - self._between
                    idle_since = time.monotonic()
                    continue
                if time.monotonic() - idle_since >= self.idle_exit or self._stopping():
                    break
                time.sleep(POLL_SECONDS)
        except TrainingInterrupted as stop:  # every slot saved a checkpoint: say so in each member's files
            for member in self.active.values():
                member.runner.report.message = f"{stop}; a restarted pack resumes from the checkpoint"
                member.runner._write_final_report()
            raise
        except Exception as err:  # the shared step failed: every member that trained fails with it
            for name, member in list(self.active.items()):
                self._fail_member(member, f"{type(err).__name__}: {err}")
            raise
        finally:
            self.write_record()
        # an owed upload: the pod's next attempt retries it (as a solo run's does)
        return 1 if any(m.phase == "UploadFailed" for m in self.record.members.values()) else 0

    def _stopping(self) -> bool:
        """SIGTERM came: no new member joins (its setup would spend the grace period)."""
        return self.shutdown is not None and self.shutdown.requested

    def between_steps(self, pack: Pack, left: list[Slot]) -> None:
        """After each pack step: count it, write what left, read DIR (cancel, join)."""
        started = time.monotonic()
        try:
            self._after_step(pack, left)
        finally:
            self._between += time.monotonic() - started

    def _after_step(self, pack: Pack, left: list[Slot]) -> None:
        self.record.step += 1
        trained = len(pack.slots) + len(left)
        self.record.concept_steps += trained
        self.concept_steps.inc(trained)
        for slot in left:
            self.leave(self.active[slot.name])
        joined = self.refresh()
        if left or joined or time.monotonic() - self._written >= RECORD_SECONDS:
            self.write_record()

    def write_record(self) -> None:
        self._written = time.monotonic()
        self.record.wall_seconds = self._written - self.started
        write_json(self.record.to_json(), self.output / PACK_FILE)

    def _update_slot_gauges(self) -> None:
        active = len(self.active)
        self.slots_gauge.labels(state="active").set(active)
        self.slots_gauge.labels(state="free").set(max(self.max_slots - active, 0))

    # ---- members come and go -----------------------------------------------------------------

    def refresh(self) -> bool:
        """Cancel members whose manifest was removed; let new manifests join while slots are free.
        Whether any member came or went."""
        try:
            manifests = read_manifests(self.folder)
        except OSError as err:  # e.g. a ConfigMap mid-swap: try again after the next step
            log.warning("pack: cannot read %s (%s); the pack goes on as it is", self.folder, err)
            return False
        before = set(self.active)
        jobs: dict[str, tuple[Path, Optional[PersonalizationJob], Optional[str]]] = {}
        for stem, path in manifests.items():
            job, error = self._parsed(path)
            name = job.metadata.name if job is not None and job.metadata is not None and job.metadata.name else stem
            if job is not None and name in jobs:  # the first file keeps the name; the second fails under its own
                jobs[stem] = (path, None, f"duplicate name {name!r}: {jobs[name][0].name} has it too")
            else:
                jobs[name] = (path, job, error)
        for name in [n for n in self.active if n not in jobs]:
            self.cancel(self.active[name])
        for name, (path, job, error) in jobs.items():
            if name in self.active or self._ended(name) or self._stopping():
                continue
            if len(self.active) >= self.max_slots:
                break
            if error is not None:
                self._fail_unjoined(name, error)
                continue
            self.join(name, job)
        self._update_slot_gauges()
        return set(self.active) != before

    def _parsed(self, path: Path) -> tuple[Optional[PersonalizationJob], Optional[str]]:
        """The manifest, parsed again only when its file changed (DIR is read after every step)."""
        try:
            stat = path.stat()
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError as err:
            return None, str(err)
        cached = self._manifests.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            parsed = (load_job(path), None)
        except (SpecError, OSError, ValueError) as err:
            parsed = (None, str(err))
        self._manifests[path] = (key, parsed)
        return parsed

    def _ended(self, name: str) -> bool:
        record = self.record.members.get(name)
        return record is not None and record.phase in ("Succeeded", "UploadFailed", "Failed", "Cancelled")

    def join(self, name: str, job: PersonalizationJob) -> None:
        record = self.record.members.setdefault(name, MemberRecord(name))
        reason = solo_only(job)
        if reason is None and self.pod_namespace and job.metadata is not None \
                and (job.metadata.namespace or self.pod_namespace) != self.pod_namespace:
            reason = f"namespace {job.metadata.namespace} is not this pack's ({self.pod_namespace}): packs never cross namespaces"
        if reason is None and self.key is not None:
            reason = self.key.difference(PackKey.of(job))
        if reason is not None:
            self._fail_unjoined(name, f"cannot join the pack: {reason}")
            return
        if self._token_in_use(job):
            return  # the same new token as a training member: it joins once that one has left
        output = self.output / name
        runner: Optional[JobRunner] = None
        try:
            output = preflight(job, output)
            if _finished(output):  # left before a restart: not trained again (an owed upload is retried)
                record.phase = self._retry_upload(name, job, output)
                return
            if self.pack is None:
                self._start(job)
            runner = self._runner(name, job, output)
            # an auto token avoids the tokens other members add (LoRA's rows are routed: no need)
            taken = tuple(m.slot.identifier.token for m in self.active.values()) \
                if METHODS[job.spec.method.value].learns_embedding else ()
            # a restart: an auto token is the one its checkpoint trained (record.token), whatever left since
            setup = runner.prepare_concept(self.models, self.resolution, self.pack.routing, taken, record.token,
                                           frozenset(self.released_tokens))
        except (TrainerInputError, SpecError, StatusReportError) as err:
            if runner is not None:  # tokens it added before it failed are free again
                self._release_tokens(runner.identifier)
                self._close(runner)
            self._fail_unjoined(name, str(err))
            return
        if setup.identifier.added:
            self.released_tokens -= set(setup.identifier.names)
        record.token = setup.identifier.token
        stage = runner.stages[0]
        printer = runner.printer(stage)
        self.routes += 1
        slot = None
        try:  # this member's own setup: its failure (e.g. a checkpoint of other images) is its alone
            slot = Slot(name, stage, job.spec, self.models, setup.identifier, setup.examples, setup.class_examples,
                        self.accelerator, self.pack.routing, runner._on_step(stage, 0, printer, self.models, self.resolution),
                        route=f"slot{self.routes}")
            self.pack.add(slot)
            runner.sampling_scope = lambda: self.pack.routing.uniform(slot.route)  # its grids show its own weights
            slot.restore(setup.checkpoints.for_stage(0, stage.name))
            slot.snapshots = Snapshots.for_stage(job.spec, runner.output, 0, True)  # output.snapshotEvery
        except Exception as err:  # noqa: BLE001
            if slot is not None:
                self.pack.leave(slot)
                self._release(slot)
            else:
                self._release_tokens(setup.identifier)
            self._close(runner)
            self._fail_unjoined(name, f"{type(err).__name__}: {err}")
            return
        self.active[name] = Member(name, runner, setup, slot, printer)
        record.phase = "Running"
        if record.joined_at is None:
            record.joined_at = self.record.step
        log.info("pack: %s joined at pack step %d (its step %d), %d slot(s) training",
                 name, self.record.step, slot.step, len(self.active))

    def _token_in_use(self, job: PersonalizationJob) -> bool:
        token = job.spec.concept.token
        return token != "auto" and METHODS[job.spec.method.value].learns_embedding and any(
            m.slot.identifier.token == token and m.slot.method.learns_embedding for m in self.active.values())

    def _start(self, job: PersonalizationJob) -> None:
        """The first member fixes the pack: its accelerator (precision) and base model."""
        self.accelerator = make_job_accelerator(job)
        loader = JobRunner(job, self.output / "_base", shutdown=self.shutdown)
        loader.accelerator = self.accelerator
        self.models, self.resolution = loader.load_models()
        self.key = PackKey.of(job)
        self.pack = Pack(self.models, self.accelerator, job.spec.training.gradient_checkpointing)

    def _runner(self, name: str, job: PersonalizationJob, output: Path) -> JobRunner:
        runner = JobRunner(job, output, shutdown=self.shutdown)
        runner.accelerator = self.accelerator
        runner.termination_message = False  # one pod, many members: each reports through its status
        namespace = self._namespace(job)
        runner.reporter = None
        if self.pod_namespace:  # in a cluster: this member's own resource
            runner.reporter = StatusReporter.from_env(member_environ(namespace, name))
        runner.metrics = TrainerMetrics(namespace, name, job.spec.method.value, job.spec.early_stopping.criterion.value)
        runner.trackers = Trackers.from_spec(job.spec, output, name)
        self.metrics.add(runner.metrics.registry)
        return runner

    def leave(self, member: Member) -> None:
        """A slot stopped (criterion, maxSteps or failure): its outputs, as a solo run writes them."""
        slot, runner = member.slot, member.runner
        record = self.record.members[member.name]
        record.left_at, record.steps = self.record.step, slot.step
        del self.active[member.name]
        try:
            if slot.failure is not None:
                raise slot.failure
            outcome = slot.outcome()
            slot.method.finish()
            runner.stage_done(slot.stage, outcome, slot.method, member.printer)
            half = self.accelerator.autocast() if self.accelerator.mixed_precision != "no" else contextlib.nullcontext()
            with half:
                code = runner.finish_concept(self.models, self.resolution, outcome.stop_step, member.setup,
                                             self.pack.routing, slot.route)
            record.stop_reason = outcome.reason.value
            # 1: trained and saved, but the upload failed (result.json says so; the next attempt retries)
            record.phase = "UploadFailed" if code == 1 else "Succeeded"
            record.message = runner.report.message if code == 1 else None
        except Exception as err:  # this member alone fails; the pack goes on
            self._fail_member(member, f"{type(err).__name__}: {err}", record)
        finally:
            self._close(runner)
            self._release(slot)
        log.info("pack: %s left at pack step %d after %d steps (%s)", member.name, self.record.step, slot.step,
                 record.stop_reason)

    def cancel(self, member: Member) -> None:
        """Its manifest was removed: it leaves now as Cancelled, with its last state written."""
        slot, runner = member.slot, member.runner
        self.pack.leave(slot)
        del self.active[member.name]
        record = self.record.members[member.name]
        record.phase, record.stop_reason = "Cancelled", StopReason.cancelled.value
        record.left_at, record.steps = self.record.step, slot.step
        runner.report.early_stop = EarlyStop(stopped=False, reason=StopReason.cancelled, step=slot.step)
        runner.report.message = "its manifest was removed from the pack's folder"
        runner._write_final_report()
        self._close(runner)
        self._release(slot)
        log.info("pack: %s cancelled at its step %d", member.name, slot.step)

    def _retry_upload(self, name: str, job: PersonalizationJob, output: Path) -> str:
        """A member that finished in an earlier attempt: upload what it still owes; its phase."""
        if not job.spec.output.uri:
            return "Succeeded"
        from personalize.storage.publish import retry_pending_upload  # noqa: PLC0415 (boto3 only with a store)

        environ = member_environ(self._namespace(job), name) if self.pod_namespace else {}
        code = retry_pending_upload(job, output, write_json, environ=environ, termination_message=False)
        return "UploadFailed" if code == 1 else "Succeeded"

    def _namespace(self, job: PersonalizationJob) -> Optional[str]:
        """The member's namespace: its manifest's, else the pod's."""
        return (job.metadata.namespace if job.metadata is not None else None) or self.pod_namespace

    def _release(self, slot: Slot) -> None:
        slot.method.release()
        self._release_tokens(slot.identifier)
        self.pack.refresh_trainable()

    def _close(self, runner: JobRunner) -> None:
        """A member is done with (it left, was cancelled or could not join): its trackers end, and
        its series leave /metrics after the linger."""
        runner.trackers.finish()
        self.metrics.retire(runner.metrics.registry)

    def _release_tokens(self, identifier: Optional[Identifier]) -> None:
        if identifier is not None and identifier.added:
            self.released_tokens |= set(identifier.names)

    def _fail_member(self, member: Member, message: str, record: Optional[MemberRecord] = None) -> None:
        record = record or self.record.members[member.name]
        record.phase, record.stop_reason, record.message = "Failed", StopReason.failed.value, message
        self.active.pop(member.name, None)
        runner = member.runner
        runner.report.message = message
        runner.report.early_stop = EarlyStop(stopped=False, reason=StopReason.failed)
        runner._write_final_report()
        self.metrics.retire(runner.metrics.registry)

    def _fail_unjoined(self, name: str, message: str) -> None:
        """A manifest that never trained: OUT/NAME/result.json says why, in one line."""
        record = self.record.members.setdefault(name, MemberRecord(name))
        record.phase, record.stop_reason, record.message = "Failed", StopReason.failed.value, message
        folder = self.output / name
        folder.mkdir(parents=True, exist_ok=True)
        write_json({"phase": "Failed", "message": message,
                    "earlyStop": {"stopped": False, "reason": StopReason.failed.value}}, folder / RESULT_FILE)
        log.error("pack: %s: %s", name, message)
        if self.pod_namespace:  # in a cluster: the member's own status says so now, not when the pack ends
            report = TrainerReport(message=message, early_stop=EarlyStop(stopped=False, reason=StopReason.failed))
            try:
                reporter = StatusReporter.from_env(member_environ(self.pod_namespace, name))
                if reporter is not None:
                    reporter.report(report, final=True)
                    reporter.close()
            except StatusReportError as err:
                log.error("pack: %s: the status could not say so: %s", name, err)


def member_environ(namespace: Optional[str], name: str) -> dict[str, str]:
    """The environment a member's status reporter reads (StatusReporter.from_env): its own resource."""
    return {**os.environ, "PJ_NAMESPACE": namespace or "", "PJ_NAME": name}


def _finished(output: Path) -> bool:
    """Whether a member's folder holds a final result.json (a decision, not an interruption)."""
    path = output / RESULT_FILE
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text())
    except ValueError:
        return False
    return bool((result.get("earlyStop") or {}).get("reason"))
