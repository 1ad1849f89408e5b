"""Preemption-safe training: checkpoints round-trip every field bit for bit, writes are
atomic, foreign and corrupt checkpoints are refused, SIGTERM becomes a flag, and a run
interrupted by real signals then resumed reproduces the uninterrupted run."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from personalize import checkpoint as ckpt_mod
from personalize.checkpoint import TrainingCheckpoint, list_checkpoints, load_latest_checkpoint, save_checkpoint
from personalize.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from personalize.fingerprint import fingerprinted_spec, spec_fingerprint
from personalize.rng_state import capture_rng, restore_rng
from personalize.trainable import load_trainable_state, trainable_state
from personalize.criteria import DvarCriterion, HallCriterion, StopPolicy
from personalize.shutdown import GracefulShutdown
from personalize.spec import parse_spec

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # works under any pytest import mode
import checkpoint_worker  # noqa: E402

SPEC = {
    "baseModel": {"builtin": "tiny-world"},
    "method": "lora",
    "concept": {"images": {"path": "images"}, "classNoun": "dog"},
    "priorPreservation": {"enabled": False},
}


@pytest.fixture(autouse=True)
def keep_global_rng():
    """These tests reseed and restore global RNGs: give the rest of the suite its streams back."""
    saved = capture_rng()
    yield
    restore_rng([saved])


# ---- helpers ---------------------------------------------------------------------------------


def trained_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        loss = model(torch.randn(5, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def make_checkpoint(step: int = 12, spec: dict = SPEC, **changes) -> TrainingCheckpoint:
    model, opt, sched = trained_optimizer()
    policy = StopPolicy(DvarCriterion(3, 0.2), max_steps=100, min_steps=5)
    hall = HallCriterion(4, 0.1)
    for v in (1.0, 0.7, 0.55, 0.5, 0.52, float("nan")):
        policy.update(v)
        hall.update(v)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tied = torch.randn(2, 3)
    gen = torch.Generator().manual_seed(99)
    torch.randn(7, generator=gen)
    fields = dict(
        step=step,
        stage="dreambooth",
        spec_fingerprint=spec_fingerprint(parse_spec(spec)),
        spec=fingerprinted_spec(parse_spec(spec)),
        trainable={
            "unet.lora_A.weight": torch.randn(4, 8, dtype=torch.float32),
            "unet.lora_B.weight": torch.randn(8, 4).to(torch.bfloat16),
            "text.embedding_rows": torch.randn(2, 6).to(torch.float16),
            "transposed_view": base.t(),  # not contiguous
            "tied.a": tied,
            "tied.b": tied,  # same storage as tied.a
            "special_values": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
            "counter": torch.tensor([3, -1], dtype=torch.int64),
        }
        | {f"linear.{k}": v for k, v in model.state_dict().items()},
        optimizer=opt.state_dict(),
        rng=[capture_rng({"data": gen}), capture_rng({"data": torch.Generator().manual_seed(5)})],
        criteria={"policy": policy.state_dict(), "hall": hall.state_dict()},
        reference={"indices": [3, 0, 7, 1], "evaluations": 2},
        loss_rows=[
            {"step": 1, "train_loss": 0.5, "deterministic_loss": 0.25, "convergence_value": None},
            {"step": 2, "train_loss": 0.1 + 0.2, "deterministic_loss": 1 / 3, "convergence_value": 0.07},
        ],
        identifier_tokens=["sks", "</w>zq"],
        extra={"lr_scheduler": sched.state_dict(), "scaler": {"scale": 65536.0, "growth_tracker": 3}},
    )
    fields.update(changes)
    return TrainingCheckpoint(**fields)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # Compare raw bytes: bit-identical, and NaN == NaN.
    assert a.detach().contiguous().reshape(-1).view(torch.uint8).tolist() == (
        b.detach().contiguous().reshape(-1).view(torch.uint8).tolist()
    )


def assert_same_tree(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert_same_tensor(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


# ---- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path):
    original = make_checkpoint()
    where = save_checkpoint(tmp_path, original)
    assert where.name == "checkpoint-000001"
    loaded = load_latest_checkpoint(tmp_path, original.spec_fingerprint)

    assert loaded.path == where
    assert loaded.step == 12 and loaded.stage == "dreambooth"
    assert set(loaded.trainable) == set(original.trainable)
    for name, tensor in original.trainable.items():
        assert_same_tensor(tensor.contiguous(), loaded.trainable[name])
    assert_same_tree(original.optimizer, loaded.optimizer)
    assert loaded.criteria == json.loads(json.dumps(original.criteria))
    assert loaded.criteria["policy"]["criterion"]["nonfinite"] == 1
    assert loaded.reference == {"indices": [3, 0, 7, 1], "evaluations": 2}
    assert loaded.loss_rows == original.loss_rows  # floats survive JSON exactly
    assert loaded.identifier_tokens == ["sks", "</w>zq"]
    assert loaded.extra == json.loads(json.dumps(original.extra))
    assert loaded.spec == original.spec and loaded.spec_fingerprint == original.spec_fingerprint
    assert len(loaded.rng) == 2
    for before, after in zip(original.rng, loaded.rng):
        assert after.python == before.python
        assert after.numpy[0] == before.numpy[0] and np.array_equal(after.numpy[1], before.numpy[1])
        assert after.numpy[2:] == tuple(before.numpy[2:])
        assert_same_tensor(before.torch_cpu, after.torch_cpu)
        assert set(after.generators) == {"data"}
        assert_same_tensor(before.generators["data"], after.generators["data"])


def test_restored_state_continues_training_identically(tmp_path):
    """Optimizer + scheduler + criterion state loaded into fresh objects behave like the originals."""
    model, opt, sched = trained_optimizer()
    policy = StopPolicy(DvarCriterion(3, 0.2), max_steps=50)
    for v in (1.0, 0.8, 0.7):
        policy.update(v)
    save_checkpoint(
        tmp_path,
        TrainingCheckpoint(
            step=3,
            spec_fingerprint="x",
            trainable=model.state_dict(),
            optimizer=opt.state_dict(),
            rng=[capture_rng()],
            criteria={"policy": policy.state_dict()},
            extra={"lr_scheduler": sched.state_dict()},
        ),
    )
    ck = load_latest_checkpoint(tmp_path, "x")
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    model2.load_state_dict(ck.trainable)
    opt2.load_state_dict(ck.optimizer)
    sched2.load_state_dict(ck.extra["lr_scheduler"])
    policy2 = StopPolicy(DvarCriterion(3, 0.2), max_steps=50)
    policy2.load_state_dict(ck.criteria["policy"])

    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for step in range(4, 8):
        for m, o, s, g in ((model, opt, sched, g1), (model2, opt2, sched2, g2)):
            loss = m(torch.randn(5, 4, generator=g)).pow(2).mean()
            o.zero_grad()
            loss.backward()
            o.step()
            s.step()
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)
        v = float(model.weight.detach().sum())
        # DVAR's running sums are stored as they are: the resumed values are bit-identical.
        assert policy2.update(v) == policy.update(v)
        assert policy.check(step) == policy2.check(step)


def draw_everything(gens: dict[str, torch.Generator]) -> list:
    return [
        [random.random() for _ in range(3)],
        random.gauss(0, 1),  # leaves a cached gaussian in python's state
        np.random.rand(3).tolist(),
        np.random.standard_normal(),  # leaves numpy's cached gaussian
        torch.rand(3).tolist(),
        {name: torch.rand(3, generator=g).tolist() for name, g in gens.items()},
    ]


def test_rng_streams_continue_identically_after_restore(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gens = {"data": torch.Generator().manual_seed(4), "reference": torch.Generator().manual_seed(5)}
    ck = make_checkpoint()  # building it draws from torch's global RNG: do that first
    draw_everything(gens)  # the run so far
    ck.rng = [capture_rng(gens)]
    save_checkpoint(tmp_path, ck)
    after_save = draw_everything(gens)  # the uninterrupted run goes on

    # A new process would start from other states: scramble everything, then restore.
    random.seed(100)
    np.random.seed(100)
    torch.manual_seed(100)
    fresh = {"data": torch.Generator().manual_seed(100), "reference": torch.Generator()}
    restore_rng(load_latest_checkpoint(tmp_path).rng, fresh)
    assert draw_everything(fresh) == after_save


def test_restore_rng_refuses_mismatched_generators_and_ranks(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(rng=[capture_rng({"data": torch.Generator()})]))
    ck = load_latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="generators to restore"):
        restore_rng(ck.rng, {})
    with pytest.raises(CheckpointError, match="generators to restore"):
        restore_rng(ck.rng, {"data": torch.Generator(), "noise": torch.Generator()})
    with pytest.raises(CheckpointError, match="rank 1"):
        restore_rng(ck.rng, {"data": torch.Generator()}, rank=1)


def lora_like_models(seed: int) -> dict[str, torch.nn.Module]:
    """A frozen base with a few trainable parts, like a LoRA/Textual Inversion setup."""
    torch.manual_seed(seed)
    unet = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    text = torch.nn.Embedding(10, 3)
    for module in (unet, text):
        module.requires_grad_(False)
    unet[1].weight.requires_grad_(True)
    text.weight.requires_grad_(True)
    return {"unet": unet, "text_encoder": text}


def test_trainable_state_saves_only_what_is_trained_and_loads_strictly(tmp_path):
    trained = lora_like_models(seed=0)
    tensors = trainable_state(trained)
    assert set(tensors) == {"unet.1.weight", "text_encoder.weight"}
    tensors["stage1.identifier_rows"] = torch.ones(1, 3)  # a carry-over the caller restores itself
    save_checkpoint(tmp_path, make_checkpoint(trainable=tensors))

    fresh = lora_like_models(seed=1)
    frozen_before = fresh["unet"][0].weight.clone()
    load_trainable_state(fresh, load_latest_checkpoint(tmp_path).trainable)
    assert torch.equal(fresh["unet"][1].weight, trained["unet"][1].weight)
    assert torch.equal(fresh["text_encoder"].weight, trained["text_encoder"].weight)
    assert torch.equal(fresh["unet"][0].weight, frozen_before)  # frozen parts untouched

    trains_less = lora_like_models(seed=2)
    trains_less["unet"][1].weight.requires_grad_(False)  # the method now trains less than was saved
    with pytest.raises(CheckpointError, match="unexpected: \\['unet.1.weight'\\]"):
        load_trainable_state(trains_less, tensors)
    fresh["unet"][0].weight.requires_grad_(True)  # the method now trains more than was saved
    with pytest.raises(CheckpointError, match="missing: \\['unet.0.weight'\\]"):
        load_trainable_state(fresh, tensors)
    other_shape = lora_like_models(seed=0) | {"text_encoder": torch.nn.Embedding(11, 3)}
    with pytest.raises(CheckpointError, match="text_encoder.weight"):
        load_trainable_state(other_shape, tensors)


# ---- atomicity and damaged checkpoints ---------------------------------------------------------


def test_failed_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make_checkpoint(step=10))
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):  # writes half a file, then fails like a full disk would
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, make_checkpoint(step=20))
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000001"]  # temp dir removed too
    assert load_latest_checkpoint(tmp_path).step == 10


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(step=10))
    good = tmp_path / "checkpoint-000001"
    # A save killed before its rename: a hidden temp dir with some files and no manifest.
    half = tmp_path / ".tmp-checkpoint-00000020-123-abcd"
    shutil.copytree(good, half)
    (half / "manifest.json").unlink()
    # A checkpoint-named dir without a manifest (e.g. a partial copy by hand) is not finished.
    unfinished = tmp_path / "checkpoint-000005"
    shutil.copytree(good, unfinished)
    (unfinished / "manifest.json").unlink()

    assert load_latest_checkpoint(tmp_path).step == 10
    # A fresh temp dir may be another pod's save in progress: left alone; an old one is removed.
    in_progress = tmp_path / ".tmp-checkpoint-00000012-456-ef01"
    in_progress.mkdir()
    old = time.time() - ckpt_mod.LEFTOVER_AGE_SECONDS - 60
    os.utime(half, (old, old))
    save_checkpoint(tmp_path, make_checkpoint(step=15))
    assert not half.exists() and in_progress.exists()
    assert load_latest_checkpoint(tmp_path).step == 15


def test_keeps_only_the_latest_in_save_order(tmp_path):
    for step in (5, 10):
        save_checkpoint(tmp_path, make_checkpoint(step=step))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000002"]
    # A periodic save and a SIGTERM save at the same step: the second one wins, no overwrite.
    save_checkpoint(tmp_path, make_checkpoint(step=10, extra={"which": "sigterm"}))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000003"]
    assert load_latest_checkpoint(tmp_path).extra == {"which": "sigterm"}
    # tiDreambooth's stage 2 counts steps from 1 again: newer despite the lower step.
    save_checkpoint(tmp_path, make_checkpoint(step=2, stage="stage2"))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000004"]
    loaded = load_latest_checkpoint(tmp_path)
    assert (loaded.stage, loaded.step) == ("stage2", 2)


def test_a_racing_writer_never_overwrites_an_existing_checkpoint(tmp_path, monkeypatch):
    """Two pods on one volume (the old one still saving on SIGTERM): both pick number 1."""
    save_checkpoint(tmp_path, make_checkpoint(step=47, extra={"who": "old pod"}), keep=2)
    real_numbered, calls = ckpt_mod._numbered, []

    def stale_listing(directory):  # the first listing misses the other pod's checkpoint
        calls.append(directory)
        return [] if len(calls) == 1 else real_numbered(directory)

    monkeypatch.setattr(ckpt_mod, "_numbered", stale_listing)
    where = save_checkpoint(tmp_path, make_checkpoint(step=50, extra={"who": "new pod"}), keep=2)
    monkeypatch.undo()
    # It picked number 1 from the stale listing, its rename onto checkpoint-000001 failed, and
    # the retry took number 2.
    assert where.name == "checkpoint-000002"
    assert load_latest_checkpoint(tmp_path).extra == {"who": "new pod"}
    assert ckpt_mod._read(tmp_path / "checkpoint-000001").extra == {"who": "old pod"}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_latest_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    save_checkpoint(tmp_path, make_checkpoint(step=10), keep=2)
    save_checkpoint(tmp_path, make_checkpoint(step=20), keep=2)
    flip_byte(tmp_path / "checkpoint-000002" / "trainable.safetensors")
    with caplog.at_level(logging.WARNING, logger="personalize.checkpoint"):
        assert load_latest_checkpoint(tmp_path).step == 10
    assert "checkpoint-000002/trainable.safetensors" in caplog.text


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: flip_byte(d / "optimizer.pt"), "optimizer.pt fails its sha256"),
        (lambda d: (d / "state.json").write_text("{"), "state.json has 1 bytes"),
        (lambda d: (d / "rng.safetensors").unlink(), "rng.safetensors is missing"),
        (lambda d: (d / "manifest.json").write_text("not json"), "manifest.json is unreadable"),
    ],
)
def test_corrupt_only_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage, message):
    save_checkpoint(tmp_path, make_checkpoint(step=10))
    damage(tmp_path / "checkpoint-000001")
    with pytest.raises(CheckpointCorruptError, match=message) as err:
        load_latest_checkpoint(tmp_path)
    assert str(tmp_path / "checkpoint-000001") in str(err.value)


def test_a_checkpoint_of_another_format_version_is_refused_not_misread(tmp_path):
    where = save_checkpoint(tmp_path, make_checkpoint())
    manifest = json.loads((where / "manifest.json").read_text())
    manifest["format"] = ckpt_mod.CHECKPOINT_FORMAT - 1
    (where / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"has format {ckpt_mod.CHECKPOINT_FORMAT - 1}; this trainer reads format"):
        load_latest_checkpoint(tmp_path)


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    assert load_latest_checkpoint(tmp_path) is None


# ---- spec fingerprint ---------------------------------------------------------------------------


def test_checkpoint_of_a_different_spec_is_refused_naming_the_fields(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint())
    other = json.loads(json.dumps(SPEC)) | {"training": {"learningRate": 0.5}, "lora": {"rank": 8}}
    spec = parse_spec(other)
    with pytest.raises(CheckpointMismatchError) as err:
        load_latest_checkpoint(tmp_path, spec_fingerprint(spec), fingerprinted_spec(spec))
    text = str(err.value)
    assert "checkpoint-000001" in text and "different spec" in text
    assert "training.learningRate" in text and "lora.rank" in text and "method" not in text


def test_fingerprint_ignores_placement_and_defaults_but_not_training_fields():
    base = parse_spec(SPEC)
    moved = parse_spec(SPEC | {"resources": {"cpu": "8", "gpus": 2}, "queueName": "q", "training": {"checkpointEvery": 50}})
    explicit_default = parse_spec(SPEC | {"training": {"seed": 0}})
    reseeded = parse_spec(SPEC | {"training": {"seed": 1}})
    assert spec_fingerprint(base) == spec_fingerprint(moved) == spec_fingerprint(explicit_default)
    assert spec_fingerprint(base) != spec_fingerprint(reseeded)


# ---- GracefulShutdown -------------------------------------------------------------------------


def wait_for(predicate) -> None:
    """Python runs a signal handler at the next bytecode boundary; give it a few."""
    for _ in range(1000):
        if predicate():
            return
        threading.Event().wait(0.001)


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    def previous(signum, frame):  # a handler someone installed before us
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with GracefulShutdown() as shutdown:
            assert not shutdown.requested
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(lambda: shutdown.requested)
            assert shutdown.requested and shutdown.signal_name == "SIGTERM"
            os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM is only counted
            wait_for(lambda: shutdown.count == 2)
            assert shutdown.count == 2 and shutdown.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_second_sigint_aborts():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulShutdown() as shutdown:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: shutdown.requested)
            assert shutdown.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False)
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_it_warns_and_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with pytest.warns(RuntimeWarning, match="main thread"):
            with GracefulShutdown() as shutdown:
                seen["installed"] = shutdown.installed
                seen["handler"] = signal.getsignal(signal.SIGTERM)
                shutdown.request("cancelled")
                seen["requested"] = (shutdown.requested, shutdown.signal_name)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"installed": False, "handler": before, "requested": (True, "cancelled")}
    assert signal.getsignal(signal.SIGTERM) is before


# ---- a real run, interrupted by real signals, resumed ---------------------------------------------


class Worker:
    """checkpoint_worker.train() in a forked child process, announcing its pauses over a pipe."""

    def __init__(self, tmp_path: Path, result: str, pause_at: int):
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe(duplex=False)
        args = (child_conn, tmp_path / "checkpoints", tmp_path / result, 25, pause_at)
        self.process = ctx.Process(target=checkpoint_worker.run_forked, args=args)
        self.process.start()
        child_conn.close()

    def next_message(self) -> str:
        assert self.conn.poll(120), "worker did not report"  # a hang guard, not a timing assert
        return self.conn.recv()

    def exit_code(self) -> int:
        self.process.join(120)
        return self.process.exitcode


def saved(directory: Path) -> list[tuple[str, int]]:
    """(name, step) of the finished checkpoints, newest first."""
    return [(p.name, json.loads((p / "manifest.json").read_text())["step"]) for p in list_checkpoints(directory)]


def signal_when_paused(worker: Worker, sig: signal.Signals, step: int) -> int:
    assert worker.next_message() == f"PAUSED {step}"
    os.kill(worker.process.pid, sig)
    return worker.exit_code()


def test_sigterm_and_sigkill_mid_run_then_resume_match_an_uninterrupted_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run single-threaded too: same kernels, same rounding
    try:
        reference = checkpoint_worker.train(None)
    finally:
        torch.set_num_threads(threads)
    stop_step = reference["stop_step"]
    assert reference["reason"] == "ConvergenceThreshold" and 100 < stop_step < 400

    # 1. SIGTERM in the middle of step 47: the worker finishes the step, checkpoints, exits 0.
    first = Worker(tmp_path, "first.json", pause_at=47)
    assert signal_when_paused(first, signal.SIGTERM, 47) == 0
    first_result = json.loads((tmp_path / "first.json").read_text())
    assert first_result["interrupted_at"] == 47 and first_result["signal"] == "SIGTERM"
    assert saved(tmp_path / "checkpoints") == [("checkpoint-000002", 47)]  # the periodic one (25) replaced

    # 2. Resumed, then SIGKILLed during step 90: no chance to save, the periodic one (75) remains.
    second = Worker(tmp_path, "second.json", pause_at=90)
    assert signal_when_paused(second, signal.SIGKILL, 90) == -signal.SIGKILL
    assert saved(tmp_path / "checkpoints") == [("checkpoint-000004", 75)]

    # 3. Resumed from 75, runs until the criterion stops it.
    third = Worker(tmp_path, "third.json", pause_at=-1)
    assert third.next_message() == "DONE" and third.exit_code() == 0
    resumed = json.loads((tmp_path / "third.json").read_text())
    assert resumed["resumed_from"] == 75

    assert resumed["stop_step"] == stop_step and resumed["reason"] == reference["reason"]
    ref_rows, got_rows = reference["rows"], resumed["rows"]
    assert [r["step"] for r in got_rows] == list(range(1, stop_step + 1))
    for ref, got in zip(ref_rows, got_rows):
        assert got["deterministic_loss"] == pytest.approx(ref["deterministic_loss"], abs=1e-6)
        assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6)
