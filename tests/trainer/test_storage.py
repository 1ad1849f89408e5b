"""Data in and out through real servers on 127.0.0.1: moto's S3 server (reached through
AWS_ENDPOINT_URL, as MinIO or Ceph would be), a TLS file server for https sources, and a
locally built Hugging Face cache for hubId + revision.

What is checked: a whole job reads its images from S3 and uploads every artifact with
result.json last; an upload cut in the middle is retried by the next attempt without training;
a checkpoint mirrored to the store restores into an empty output folder; https archives and
manifests; object keys and archive members never become paths; credentials appear nowhere.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from personalize.run import main

from job_specs import job_spec
from storage_servers import ACCESS_KEY, SECRET_KEY, FaultyProxy, HttpsFiles, MotoS3, build_hub_cache
from test_resume import STEP_LINE, command, read_rows, run_until_sigterm, trainer_env

BUCKET = "studio"


@pytest.fixture(scope="module")
def moto():
    server = MotoS3()
    yield server
    server.close()


@pytest.fixture
def s3(moto, monkeypatch, tmp_path):
    """A fresh bucket with the concept's images under `cat/`, and the job's AWS environment."""
    import uuid

    bucket = f"{BUCKET}-{uuid.uuid4().hex[:8]}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PJ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PJ_STORAGE_BACKOFF", "0.01")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the trainer's own retries are under test
    return bucket, client


def put_concept(client, bucket: str, concept_dir: Path, prefix: str = "cat/") -> list[str]:
    keys = []
    for path in sorted(concept_dir.iterdir()):
        client.put_object(Bucket=bucket, Key=f"{prefix}{path.name}", Body=path.read_bytes())
        keys.append(f"{prefix}{path.name}")
    client.put_object(Bucket=bucket, Key=f"{prefix}notes.txt", Body=b"not an image: skipped")
    return keys


def remote_files(client, bucket: str, prefix: str) -> dict[str, bytes]:
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


def local_files(output: Path) -> dict[str, bytes]:
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in output.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def write_job(tmp_path: Path, spec: dict) -> Path:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                                      "metadata": {"name": "cat", "namespace": "team-a"}, "spec": spec}))
    return config


def s3_spec(pipeline_dir: Path, bucket: str, method: str = "textualInversion", **overrides) -> dict:
    spec = job_spec(pipeline_dir, Path("unused"), method, **overrides)
    spec["concept"]["images"] = {"uri": f"s3://{bucket}/cat/", "secretRef": {"name": "studio-s3"}}
    spec["output"] = {"uri": f"s3://{bucket}/runs/cat", "secretRef": {"name": "studio-s3"}}
    return spec


def test_a_dreambooth_job_reads_s3_images_and_uploads_every_artifact_with_result_json_last(
        moto, s3, tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch, capsys, caplog):
    bucket, client = s3
    put_concept(client, bucket, concept_dir)
    proxy = FaultyProxy(moto.port)  # only to see the order of the writes
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("PJ_TERMINATION_LOG", str(tmp_path / "termination"))
    config = write_job(tmp_path, s3_spec(tiny_pipeline_dir, bucket, "dreambooth"))
    output = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    try:
        assert main(["--config", str(config), "--output", str(output)]) == 0
    finally:
        proxy.close()

    # The images came from the bucket (6 of them, notes.txt skipped), decoded into the cache.
    cached = list((tmp_path / "cache" / "concept-images").iterdir())
    assert len(cached) == 1 and sorted(p.name for p in cached[0].iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert [p.read_bytes() for p in sorted(cached[0].iterdir())] == [p.read_bytes() for p in sorted(concept_dir.iterdir())]

    # Everything in the output folder is in the store, byte for byte; checkpoints and state stay local.
    local, remote = local_files(output), remote_files(client, bucket, "runs/cat/")
    assert set(remote) == set(local) and all(remote[k] == local[k] for k in local)
    assert any(k.startswith("pipeline/unet/") for k in remote)  # the DreamBooth pipeline folder
    result = json.loads(remote["result.json"])
    assert result["artifact"]["location"] == f"s3://{bucket}/runs/cat"
    assert "message" not in result
    # result.json was the last object written (the probe object comes first, then the artifacts).
    writes = [p for p in proxy.paths if "/runs/cat/" in p and ".write-test" not in p]
    assert writes[-1].endswith("/runs/cat/result.json") and sum(p.endswith("result.json") for p in writes) == 1
    assert_no_credentials(capsys, caplog, output, tmp_path / "termination")


def assert_no_credentials(capsys, caplog, output: Path, *files: Path) -> None:
    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text]
    texts += [p.read_text(errors="replace") for p in [*output.rglob("*.json"), *output.rglob("*.csv"), *files]
              if p.is_file()]
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_an_upload_cut_midway_is_finished_by_the_next_attempt_without_training(
        moto, s3, tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch, capsys, caplog):
    bucket, client = s3
    put_concept(client, bucket, concept_dir)
    proxy = FaultyProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("PJ_STORAGE_RETRIES", "1")
    config = write_job(tmp_path, s3_spec(tiny_pipeline_dir, bucket, "lora"))
    output = tmp_path / "out"
    try:
        proxy.fail_writes_after = 4  # the probe's write, then 3 artifacts; the store then goes away
        assert main(["--config", str(config), "--output", str(output)]) == 1
        # Nothing lost: the artifacts are local, result.json says where and what failed.
        report = json.loads((output / "result.json").read_text())
        assert report["artifact"]["location"] == str(output)
        assert "upload to" in report["message"] and "the next attempt retries the upload" in report["message"]
        assert report["earlyStop"]["reason"] in ("MaxSteps", "ConvergenceThreshold")
        partial = remote_files(client, bucket, "runs/cat/")
        assert 0 < len(partial) < len(local_files(output)) and "result.json" not in partial
        trained = {p: (output / p).stat().st_mtime_ns for p in ("losses.csv", "pytorch_lora_weights.safetensors")}

        # The next attempt: the store is back; it uploads what is missing and does not train.
        proxy.fail_writes_after, proxy.writes = None, 0
        from personalize import job_runner

        monkeypatch.setattr(job_runner.JobRunner, "execute", lambda self: pytest.fail("trained again"))
        caplog.set_level(logging.INFO, logger="personalize.storage")  # whatever earlier tests did to its level
        assert main(["--config", str(config), "--output", str(output)]) == 0
    finally:
        proxy.close()
    assert "retrying the upload" in caplog.text
    assert {p: (output / p).stat().st_mtime_ns for p in trained} == trained
    local, remote = local_files(output), remote_files(client, bucket, "runs/cat/")
    assert set(remote) == set(local) and all(remote[k] == local[k] for k in local)
    assert proxy.writes == len(local) - len(partial)  # what was uploaded before is not sent again
    report = json.loads(remote["result.json"])
    assert report["artifact"]["location"] == f"s3://{bucket}/runs/cat" and "message" not in report
    assert json.loads((output / "result.json").read_text()) == report


@pytest.mark.slow
def test_a_checkpoint_mirrored_to_the_store_resumes_in_an_empty_output_folder(moto, s3, tiny_pipeline_dir, concept_dir,
                                                                               tmp_path):
    bucket, client = s3
    put_concept(client, bucket, concept_dir)
    spec = {
        "baseModel": {"path": str(tiny_pipeline_dir)}, "method": "textualInversion",
        "concept": {"images": {"uri": f"s3://{bucket}/cat/"}, "classNoun": "triangle"},
        "training": {"maxSteps": 10, "batchSize": 2, "checkpointEvery": 3, "learningRate": 0.02},
        "earlyStopping": {"criterion": "none", "referenceBatchSize": 2},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
        "output": {"uri": f"s3://{bucket}/runs/resume"},
        "reporting": {"logEverySteps": 1},  # the interrupt waits for the line of step 4
    }
    config = write_job(tmp_path, spec)
    env = {**trainer_env(tmp_path / "termination"), **moto.env(), "PJ_CACHE_DIR": str(tmp_path / "cache")}
    first = tmp_path / "node-a"
    code, stdout = run_until_sigterm(config, first, env, at_step=4)
    assert code == 143, stdout[-3000:]
    state = json.loads(next((first / "checkpoints").glob("checkpoint-*/state.json")).read_text())
    remote = remote_files(client, bucket, "runs/resume/checkpoints/")
    name = next(k.split("/")[0] for k in remote)
    assert {k.split("/")[1] for k in remote} >= {"manifest.json", "state.json", "trainable.safetensors"}
    assert json.loads(remote[f"{name}/state.json"])["step"] == state["step"]

    # Another node: an empty output folder (the emptyDir went with the old pod) and a cold cache.
    second = tmp_path / "node-b"
    env["PJ_CACHE_DIR"] = str(tmp_path / "cache-b")
    proc = subprocess.run(command(config, second), capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint {name} restored from s3://{bucket}/runs/resume/checkpoints/{name}" in proc.stderr
    assert int(STEP_LINE.search(proc.stdout).group(1)) == state["step"] + 1
    rows = read_rows(second / "losses.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    # losses.csv has the union of every row's columns; a column a checkpointed row lacks (a step without
    # evaluation has no per-timestep L_det) is written empty.
    assert rows[: state["step"]] == [{k: ("" if row.get(k) is None else str(row[k])) for k in rows[0]}
                                     for row in state["loss_rows"]]
    # Done: the artifacts are uploaded and the mirrored checkpoints removed.
    remote = remote_files(client, bucket, "runs/resume/")
    assert "result.json" in remote and not any(k.startswith("checkpoints/") for k in remote)


# ---- https ------------------------------------------------------------------------------------


@pytest.fixture
def https_site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    server = HttpsFiles(root, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.cert))
    monkeypatch.setenv("PJ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PJ_STORAGE_BACKOFF", "0.01")
    yield root, server.url
    server.close()


def _fetch(uri: str) -> list[bytes]:
    from personalize.storage.images import fetch_concept_images

    return [p.read_bytes() for p in sorted(fetch_concept_images(uri).iterdir())]


def test_https_archives_and_manifests_give_the_same_images(https_site, concept_dir):
    root, url = https_site
    images = sorted(concept_dir.iterdir())
    with zipfile.ZipFile(root / "cat.zip", "w") as archive:
        for p in images:
            archive.write(p, f"cat/{p.name}")
        archive.writestr("cat/README.md", "skipped")
    with tarfile.open(root / "cat.tar.gz", "w:gz") as archive:
        for p in images:
            archive.add(p, f"./cat/{p.name}")
    (root / "photos").mkdir()
    for p in images:
        shutil.copy(p, root / "photos" / p.name)
    lines = ["# the cat", *[f"photos/{p.name}" for p in images[:3]], *[f"{url}/photos/{p.name}" for p in images[3:]], ""]
    (root / "cat.txt").write_text("\n".join(lines))

    want = [p.read_bytes() for p in images]
    for source in ("cat.zip", "cat.tar.gz", "cat.txt"):
        assert _fetch(f"{url}/{source}") == want, source


def test_archive_members_and_object_keys_never_become_paths(https_site, concept_dir, tmp_path, moto, s3):
    root, url = https_site
    image = sorted(concept_dir.iterdir())[0].read_bytes()
    escape = tmp_path / "escaped.png"
    with tarfile.open(root / "evil.tar.gz", "w:gz") as archive:
        for name in ("../../escaped.png", str(escape), "ok.png"):
            info = tarfile.TarInfo(name)
            info.size = len(image)
            archive.addfile(info, io.BytesIO(image))
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    assert len(_fetch(f"{url}/evil.tar.gz")) == 3  # the symlink is not a regular file: skipped
    assert not escape.exists() and not (tmp_path.parent / "escaped.png").exists()

    bucket, client = s3
    for key in ("cat/../../escaped.png", "cat//abs.png", "cat/ok.png"):
        client.put_object(Bucket=bucket, Key=key, Body=image)
    assert len(_fetch(f"s3://{bucket}/cat/")) == 3
    assert not escape.exists() and not list(Path("/").glob("abs.png"))


# ---- the hub ----------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_cached_hub_revision_loads_offline(tiny_pipeline_dir, tmp_path, monkeypatch):
    from personalize.pipeline_io import load_base_pipeline
    from personalize.spec import BaseModelSource
    from personalize.storage import hub

    hf_home = tmp_path / "hf"
    snapshot = build_hub_cache(hf_home / "hub", "tiny-org/tiny-sd", tiny_pipeline_dir, COMMIT, refs={"main": COMMIT, "v1": COMMIT})
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: any request would fail
    hub._resolve.cache_clear()
    for revision in ("v1", COMMIT, None):
        assert hub.resolve_snapshot("tiny-org/tiny-sd", revision) == snapshot
    pipe = load_base_pipeline(BaseModelSource(hub_id="tiny-org/tiny-sd", revision="v1"))
    same = load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir)))
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), same.unet.state_dict().values()))
    # Not in the cache, offline: one clear error.
    from personalize.errors import TrainerInputError

    with pytest.raises(TrainerInputError, match="revision 'v2' is not in the cache .* and HF_HUB_OFFLINE is set"):
        hub.resolve_snapshot("tiny-org/tiny-sd", "v2")


def test_pickled_hub_weights_load_only_when_the_job_opts_in(tiny_pipeline_dir, tmp_path, monkeypatch):
    from personalize.errors import TrainerInputError
    from personalize.pipeline_io import load_base_pipeline
    from personalize.spec import BaseModelSource
    from personalize.storage import hub

    hf_home = tmp_path / "hf"
    build_hub_cache(hf_home / "hub", "tiny-org/pickled", tiny_pipeline_dir, COMMIT, pickled=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub._resolve.cache_clear()
    with pytest.raises(TrainerInputError, match="component 'unet' has no .safetensors weights"):
        load_base_pipeline(BaseModelSource(hub_id="tiny-org/pickled"))
    pipe = load_base_pipeline(BaseModelSource(hub_id="tiny-org/pickled", allow_pickle_weights=True))
    same = load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir)))
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), same.unet.state_dict().values()))


# ---- retries and messages -----------------------------------------------------------------------


def test_transient_failures_are_retried_and_the_users_are_not(monkeypatch):
    from personalize.errors import TrainerInputError
    from personalize.storage.locations import StorageUnavailable, with_retries

    monkeypatch.setenv("PJ_STORAGE_BACKOFF", "0")
    monkeypatch.setenv("PJ_STORAGE_RETRIES", "3")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "data"

    assert with_retries("download", flaky, where="s3://b/k") == "data" and len(calls) == 3

    def gone():
        calls.append(1)
        raise TimeoutError("read timed out")

    calls.clear()
    with pytest.raises(StorageUnavailable, match=r"download s3://b/k failed after 4 attempts: TimeoutError"):
        with_retries("download", gone, where="s3://b/k")
    assert len(calls) == 4

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    calls.clear()
    with pytest.raises(TrainerInputError, match=r"^s3://b/k: access denied"):
        with_retries("download", denied, where="s3://b/k")
    assert len(calls) == 1  # the user's problem: never retried


def test_denied_credentials_give_one_line_that_names_no_credential(tiny_pipeline_dir, concept_dir, tmp_path,
                                                                    monkeypatch, capsys, caplog):
    strict = MotoS3(strict=True)
    try:
        for name, value in strict.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PJ_STORAGE_BACKOFF", "0")
        caplog.set_level(logging.DEBUG)
        spec = job_spec(tiny_pipeline_dir, concept_dir, "textualInversion")
        spec["output"] = {"uri": "s3://results/cat", "secretRef": {"name": "studio-s3"}}
        config = write_job(tmp_path, spec)
        assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    finally:
        strict.close()
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: output.uri 's3://results/cat': access denied (check the credentials in the job's secretRef)"]
    assert SECRET_KEY not in err + caplog.text and ACCESS_KEY not in err + caplog.text


def test_caption_files_come_along_from_buckets_and_archives(https_site, concept_dir, moto, s3):
    """`photo.txt` beside `photo.png` becomes the downloaded image's caption file (00000.txt
    beside 00000.png); an image without one has none; other .txt objects are not captions."""
    from personalize.storage.images import fetch_concept_images

    images = sorted(concept_dir.iterdir())
    captions = {images[0].name: b"a {token} on grass", images[3].name: b"red stripes"}
    bucket, client = s3
    put_concept(client, bucket, concept_dir)  # with notes.txt, a caption of no image
    for name, text in captions.items():
        client.put_object(Bucket=bucket, Key=f"cat/{name.rsplit('.', 1)[0]}.txt", Body=text)
    root, url = https_site
    with zipfile.ZipFile(root / "captioned.zip", "w") as archive:
        for p in images:
            archive.write(p, f"cat/{p.name}")
        for name, text in captions.items():
            archive.writestr(f"cat/{name.rsplit('.', 1)[0]}.txt", text)

    for uri in (f"s3://{bucket}/cat/", f"{url}/captioned.zip"):
        folder = fetch_concept_images(uri)
        got = {}
        for i, p in enumerate(images):
            local = sorted(folder.glob("*.png"))[i]
            assert local.read_bytes() == p.read_bytes()
            if local.with_suffix(".txt").exists():
                got[p.name] = local.with_suffix(".txt").read_bytes()
        assert got == captions, uri
