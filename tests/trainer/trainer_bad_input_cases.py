"""The trainer's rows of the bad-input table (docs/bad-input.md), kept in one list.

Each case starts from a small valid textualInversion job (tests/trainer/conftest.py `job_spec`),
breaks one thing (the spec, the files it points to, the command line or the environment) and
expects `personalize-train` to end with exit code 2 and exactly one line `error: <message>` on
stderr, without starting to train. `{dir}` in a message stands for the case's own temporary
folder. `test_bad_input.py` drives every case through `personalize.run.main` and checks that the
document's trainer rows are exactly `render_rows()`.

Torch-free on purpose: `python tests/operator/bad_input_cases.py` imports it to rewrite the table.
"""

from __future__ import annotations

import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table format
import bad_input_table as table  # noqa: E402
from bad_input_table import DOC, HEADER  # noqa: E402
SECTION = """## Trainer: `personalize-train`

Rows `T1`, `T2`, ... are input the trainer itself refuses: what the operator cannot see from the
spec alone (the files behind the paths, the pod's environment) or what someone gives the trainer
directly on the command line. Each ends, before any training step, with exit code 2 and exactly
one line `error: <message>` on stderr (no traceback). In a cluster the Job's podFailurePolicy
fails it at once (no retry) and the operator sets phase `Failed`, reason `BadInput`, with that
line (from the pod's termination message) in the condition. The input column says what is broken
in an otherwise valid textualInversion job; `{dir}` is the job's working folder, `{port}` a
port another process holds and `{bucket}` a bucket of the S3 endpoint the job reaches through
`AWS_ENDPOINT_URL` (the tests use moto's server; `{first}` and `{size}` name its first object).
The hub rows run against a local endpoint (`HF_ENDPOINT`) or a local cache (`HF_HOME`). A store
or hub that cannot be reached is not bad input: it is retried, and then the attempt fails (exit
1) so that the Job tries again. These rows are generated from
`tests/trainer/trainer_bad_input_cases.py` (by the same `python tests/operator/bad_input_cases.py`);
`tests/trainer/test_bad_input.py` drives each through `personalize-train` in-process.

"""
PREFIX = "T"  # the trainer's rows are numbered T1, T2, ...


@dataclass
class Workspace:
    """What one case may change before the trainer runs."""

    dir: Path  # the case's own empty folder (`{dir}` in messages)
    spec: dict  # a valid job spec (camelCase) to break
    concept_dir: Path  # 6 valid concept images (do not modify: shared between cases)
    pipeline_dir: Path  # a valid tiny diffusers pipeline folder (shared too)
    output: Path = field(init=False)
    config: Path = field(init=False)  # where the spec is written as YAML, unless the case writes it
    write_config: bool = True
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set for the run
    unset_env: list[str] = field(default_factory=list)
    values: dict[str, str] = field(default_factory=dict)  # placeholders in the message: {dir}, {port}
    closers: list[Callable[[], None]] = field(default_factory=list)  # run after the trainer returned

    def __post_init__(self) -> None:
        self.output = self.dir / "out"
        self.config = self.dir / "job.yaml"
        self.values["dir"] = str(self.dir)

    def fill(self, text: str) -> str:
        """`text` with its placeholders ({dir}, {port}) replaced by this workspace's values."""
        for name, value in self.values.items():
            text = text.replace("{" + name + "}", value)
        return text

    def argv(self) -> list[str]:
        return ["--config", str(self.config), "--output", str(self.output), *self.extra_args]


@dataclass(frozen=True)
class Case:
    key: str
    area: str
    input: str  # markdown for the input column
    message: str  # the exact text after `error: ` (see Workspace.values for its placeholders)
    prepare: Callable[[Workspace], None]


# ---- how the cases break the job ------------------------------------------------------------------

Prepare = Callable[[Workspace], None]


def spec_sets(section: str, **values) -> Prepare:
    """Set fields of one spec section ("" for the top level); "{dir}" in a string is the workspace."""
    def prepare(ws: Workspace) -> None:
        target = ws.spec[section] if section else ws.spec
        target.update({k: ws.fill(v) if isinstance(v, str) else v for k, v in values.items()})
    return prepare


def without_package(name: str, **sections) -> Prepare:
    """Spec sections set, in a run where the package `name` cannot be found (as in an image without it):
    a None entry in sys.modules makes importlib's find_spec and import both miss it."""
    def prepare(ws: Workspace) -> None:
        ws.spec.update(sections)
        before = sys.modules.get(name)
        sys.modules[name] = None  # type: ignore[assignment]
        ws.closers.append(lambda: sys.modules.__setitem__(name, before) if before else sys.modules.pop(name, None))
    return prepare


def images_at(make_folder: Callable[[Workspace], Path]) -> Prepare:
    """Point concept.images.path at the folder `make_folder` builds in the workspace."""
    return lambda ws: ws.spec["concept"].update(images={"path": str(make_folder(ws))})


def folder_with(files: dict[str, bytes], name: str = "images", good_images: int = 0) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        folder = ws.dir / name
        folder.mkdir()
        for p in sorted(ws.concept_dir.iterdir())[:good_images]:
            shutil.copy(p, folder / p.name)
        for file_name, data in files.items():
            (folder / file_name).write_bytes(data)
        return folder
    return make


def a_file(name: str) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        (ws.dir / name).write_bytes(b"")
        return ws.dir / name
    return make


def config_holds(text: str) -> Prepare:
    def prepare(ws: Workspace) -> None:
        ws.config.write_text(text)
        ws.write_config = False
    return prepare


def no_config_file(ws: Workspace) -> None:
    ws.config, ws.write_config = ws.dir / "none.yaml", False


def model_folder(files: dict[str, str]) -> Prepare:
    """baseModel.path: a folder with a `unet/` subfolder and these files."""
    def prepare(ws: Workspace) -> None:
        folder = ws.dir / "model"
        (folder / "unet").mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)
        ws.spec["baseModel"] = {"path": str(folder)}
    return prepare


def single_file_model(name: str, config: dict[str, str] | None = None) -> Prepare:
    """baseModel.path: one checkpoint file (its content is never read: the case fails before),
    with baseModel.config a folder holding `config`'s files when given."""
    def prepare(ws: Workspace) -> None:
        (ws.dir / name).write_bytes(b"weights")
        ws.spec["baseModel"] = {"path": str(ws.dir / name)}
        if config is not None:
            (ws.dir / "config").mkdir()
            for file_name, text in config.items():
                (ws.dir / "config" / file_name).write_text(text)
            ws.spec["baseModel"]["config"] = str(ws.dir / "config")
    return prepare


def clip_folder_without_processor(ws: Workspace) -> None:
    """criterion clip with a CLIPModel folder that holds no image processor."""
    folder = ws.dir / "clip"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clip"}')
    ws.spec["earlyStopping"].update(criterion="clip", clip={"modelPath": str(folder)})


def volume_not_mounted(ws: Workspace) -> None:
    ws.env["PJ_VOLUMES_ROOT"] = str(ws.dir / "volumes")  # where the pod would mount claims; empty here
    ws.spec["concept"]["images"] = {"claimName": "concept-images", "path": "cat"}


def output_under_a_file(ws: Workspace) -> None:
    (ws.dir / "a-file").write_text("")
    ws.output = ws.dir / "a-file" / "out"  # no directory can be made under a regular file, even as root


def output_is_a_file(ws: Workspace) -> None:
    ws.output = ws.dir / "result"
    ws.output.write_text("")


def args(*extra: str) -> Prepare:
    return lambda ws: ws.extra_args.extend(extra)


def metrics_port_taken(ws: Workspace) -> None:
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    ws.closers.append(sock.close)
    ws.values["port"] = str(sock.getsockname()[1])
    ws.extra_args += ["--metrics-port", ws.values["port"]]


def named_resource(**env: str) -> Prepare:
    """PJ_NAMESPACE/PJ_NAME set (status reporting on) plus `env`; unset variables are removed."""
    def prepare(ws: Workspace) -> None:
        ws.env.update(PJ_NAMESPACE="team-a", PJ_NAME="cat")
        ws.unset_env += ["KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "PJ_STATUS_INTERVAL"]
        ws.env.update({k: v.replace("{dir}", str(ws.dir)) for k, v in env.items()})
    return prepare


# ---- object stores and the hub (real servers on 127.0.0.1: tests/trainer/storage_servers.py) ----


def _servers():
    import storage_servers  # moto and http servers: imported only when a case runs

    return storage_servers


def s3_images(objects: dict[str, bytes] | None = None, *, good_images: int = 0, prefix: str = "cat/",
              strict: bool = False, credentials: bool = True, bucket: bool = True, **env: str) -> Prepare:
    """concept.images.uri on a bucket of moto's server holding `objects` (and good images) under `prefix`."""
    def prepare(ws: Workspace) -> None:
        servers = _servers()
        moto = servers.shared_moto(strict)
        name = f"case-{ws.dir.name.lower().replace('_', '-')[-40:].strip('-')}"
        ws.values["bucket"] = name
        if bucket and not strict:
            client = moto.client()
            client.create_bucket(Bucket=name)
            for p in sorted(ws.concept_dir.iterdir())[:good_images]:
                client.put_object(Bucket=name, Key=f"{prefix}{p.name}", Body=p.read_bytes())
            for key, data in (objects or {}).items():
                client.put_object(Bucket=name, Key=f"{prefix}{key}", Body=data)
        ws.env.update(moto.env(), PJ_CACHE_DIR=str(ws.dir / "cache"), PJ_STORAGE_BACKOFF="0.01", **env)
        if not credentials:
            ws.unset_env += ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            del ws.env["AWS_ACCESS_KEY_ID"], ws.env["AWS_SECRET_ACCESS_KEY"]
            ws.env["AWS_SHARED_CREDENTIALS_FILE"] = ws.env["AWS_CONFIG_FILE"] = str(ws.dir / "no-aws-config")
        ws.spec["concept"]["images"] = {"uri": f"s3://{name}/{prefix}"}
    return prepare


def output_on_denying_store(ws: Workspace) -> None:
    moto = _servers().shared_moto(strict=True)
    ws.env.update(moto.env(), PJ_STORAGE_BACKOFF="0.01")
    ws.spec["output"] = {"uri": "s3://results/runs/cat"}


def image_over_cap(ws: Workspace) -> None:
    s3_images(good_images=2, PJ_MAX_IMAGE_BYTES="100")(ws)
    first = sorted(ws.concept_dir.iterdir())[0]
    ws.values["first"], ws.values["size"] = first.name, str(first.stat().st_size)


def hub_model(hub_id: str, revision: str | None = None) -> Prepare:
    """baseModel.hubId against a local hub endpoint that knows one repository and none of its revisions."""
    def prepare(ws: Workspace) -> None:
        hub = _servers().FakeHub()
        ws.closers.append(hub.close)
        ws.env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(ws.dir / "hf"))
        ws.unset_env += ["HF_HUB_OFFLINE", "HF_HUB_CACHE"]
        ws.spec["baseModel"] = {"hubId": hub_id, **({"revision": revision} if revision else {})}
    return prepare


def hub_cache_with_pickled_weights(ws: Workspace) -> None:
    hub_cache = ws.dir / "hf" / "hub"
    _servers().build_hub_cache(hub_cache, "tiny-org/pickled", ws.pipeline_dir, "0" * 40, pickled=True)
    ws.env.update(HF_HOME=str(ws.dir / "hf"), HF_HUB_OFFLINE="1")
    ws.unset_env += ["HF_HUB_CACHE"]
    ws.spec["baseModel"] = {"hubId": "tiny-org/pickled"}


TRUNCATED_JPEG = b"\xff\xd8\xff\xe0 truncated jpeg"
HTML_PAGE = b"<html><body>403 Forbidden</body></html>\n"  # what a failed download often saves
TINY_INDEX = '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
SDXL_INDEX = '{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
FLUX_INDEX = '{"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}'
REFERENCE = "earlyStopping.referenceBatchSize x referenceSubBatches"

CASES: list[Case] = [
    # ---- spec ----
    Case("config-missing", "spec", "`--config {dir}/none.yaml`, no such file",
         "config file '{dir}/none.yaml' does not exist",
         no_config_file),
    Case("config-not-yaml", "spec", "config file holds `spec: {method: lora` (unclosed)",
         "config file '{dir}/job.yaml' is not valid YAML/JSON: while parsing a flow mapping",
         config_holds("spec: {method: lora\n")),
    Case("config-not-a-mapping", "spec", "config file holds a YAML list",
         "config: expected a mapping (a PersonalizationJob manifest or its spec)",
         config_holds("- method: lora\n")),
    Case("unknown-method", "spec", "`method: hypernetwork`",
         "spec.method: Input should be 'textualInversion', 'dreambooth', 'lora', 'customDiffusion' or 'tiDreambooth'",
         spec_sets("", method="hypernetwork")),
    Case("unknown-criterion", "spec", "`earlyStopping.criterion: patience`",
         "spec.earlyStopping.criterion: Input should be 'dvar', 'ema', 'hall', 'trend', 'clip' or 'none'",
         spec_sets("earlyStopping", criterion="patience")),
    Case("clip-without-model", "spec", "`earlyStopping.criterion: clip`, no `clip.modelPath`",
         "earlyStopping.clip.modelPath: criterion clip needs a CLIP model folder",
         spec_sets("earlyStopping", criterion="clip")),
    Case("token-in-vocabulary", "spec", "`concept.token: sks`, a word the tokenizer knows (textualInversion adds a new token)",
         "concept.token 'sks' already exists in the tokenizer's vocabulary; textualInversion trains a new embedding "
         "for its token: choose a word the tokenizer does not know (e.g. '<my-concept>') or use token: auto",
         spec_sets("concept", token="sks")),
    Case("token-not-in-vocabulary", "spec", "`method: lora`, `concept.token: zwx`, not one token of the vocabulary",
         "concept.token 'zwx' is not a token of the tokenizer's vocabulary (it splits into 2); lora trains no token "
         "embedding, so its identifier must be an existing rare token: use token: auto or a rare word such as 'sks'",
         lambda ws: (spec_sets("", method="lora")(ws), spec_sets("concept", token="zwx")(ws))),
    Case("token-is-the-class-noun", "spec", "`method: dreambooth`, `concept.token: triangle`, the class noun",
         "concept.token 'triangle' is a word of the class noun, captions or prompts, so the concept could not be "
         "told apart from it: use token: auto or a rare word such as 'sks'",
         lambda ws: (spec_sets("", method="dreambooth")(ws), spec_sets("concept", token="triangle")(ws))),
    # ---- images ----
    Case("images-missing", "images", "`concept.images.path` names no folder",
         "concept image folder '{dir}/nope' does not exist",
         images_at(lambda ws: ws.dir / "nope")),
    Case("images-not-a-folder", "images", "`concept.images.path` names a file",
         "concept image folder '{dir}/cat.png' is not a directory",
         images_at(a_file("cat.png"))),
    Case("images-empty", "images", "empty image folder",
         "concept image folder '{dir}/images' has no images (png/jpg/jpeg/webp)",
         images_at(folder_with({}))),
    Case("images-wrong-types", "images", "folder holding only `cat.gif`, `cat.bmp`, `notes.txt`",
         "concept image folder '{dir}/images' has no images (png/jpg/jpeg/webp)",
         images_at(folder_with({"cat.gif": b"GIF89a", "cat.bmp": b"BM", "notes.txt": b"cat"}))),
    Case("image-truncated", "images", "3 good images and a truncated `broken.jpg`",
         "image '{dir}/images/broken.jpg' cannot be read (OSError: Truncated File Read)",
         images_at(folder_with({"broken.jpg": TRUNCATED_JPEG}, good_images=3))),
    Case("image-not-an-image", "images", "3 good images and a `photo.png` that is an HTML error page",
         "image '{dir}/images/photo.png' cannot be read (UnidentifiedImageError: cannot identify image file "
         "'{dir}/images/photo.png')",
         images_at(folder_with({"photo.png": HTML_PAGE}, good_images=3))),
    Case("images-too-few", "images", "1 image, `earlyStopping.referenceBatchSize: 2`",
         f"{REFERENCE} = 2 reference examples, but the concept has only 1 image(s)",
         images_at(folder_with({}, good_images=1))),
    Case("reference-batch-too-large", "images", "6 images, `earlyStopping.referenceBatchSize: 8`",
         f"{REFERENCE} = 8 reference examples, but the concept has only 6 image(s)",
         spec_sets("earlyStopping", referenceBatchSize=8)),
    Case("holdout-leaves-nothing", "images",
         "6 images, `earlyStopping: {referenceBatchSize: 3, referenceSubBatches: 2, holdout: true}`",
         "earlyStopping.holdout: holding out 6 reference image(s) leaves no training images (the concept has 6); "
         "add images, lower referenceBatchSize or set holdout: false",
         spec_sets("earlyStopping", referenceBatchSize=3, referenceSubBatches=2, holdout=True)),
    Case("images-bucket-missing", "images", "`concept.images.uri: s3://{bucket}/cat/`, no such bucket",
         "concept.images.uri 's3://{bucket}/cat/': bucket s3://{bucket} does not exist",
         s3_images(bucket=False)),
    Case("images-prefix-empty", "images", "`concept.images.uri: s3://{bucket}/cat/`, nothing under the prefix",
         "concept.images.uri 's3://{bucket}/cat/': the prefix holds no objects",
         s3_images()),
    Case("images-prefix-no-images", "images", "the prefix holds only `notes.txt` and `cat.gif`",
         "concept.images.uri 's3://{bucket}/cat/' holds no images (png/jpg/jpeg/webp)",
         s3_images({"notes.txt": b"cat", "cat.gif": b"GIF89a"})),
    Case("images-credentials-denied", "images", "the store does not know the Secret's `AWS_ACCESS_KEY_ID`",
         "concept.images.uri 's3://{bucket}/cat/': bucket s3://{bucket}: access denied "
         "(check the credentials in the job's secretRef)",
         s3_images(strict=True)),
    Case("images-no-credentials", "images", "no `secretRef`, no AWS credentials in the pod, no workload identity",
         "concept.images.uri 's3://{bucket}/cat/': bucket s3://{bucket}: no credentials "
         "(set secretRef, or give the pod a workload identity)",
         s3_images(credentials=False)),
    Case("image-object-not-an-image", "images", "3 good images and `cat/photo.png` holding an HTML error page",
         "s3://{bucket}/cat/photo.png is not a readable image (UnidentifiedImageError)",
         s3_images({"photo.png": HTML_PAGE}, good_images=3)),
    Case("image-object-over-cap", "images", "an object larger than `PJ_MAX_IMAGE_BYTES=100`",
         "s3://{bucket}/cat/{first} is {size} bytes, more than the cap of 100 (PJ_MAX_IMAGE_BYTES)",
         image_over_cap),
    Case("images-https-folder", "images", "`concept.images.uri: https://photos.example.com/cat/` (a folder)",
         "concept.images.uri 'https://photos.example.com/cat/': an https source must be an archive "
         "(.zip, .tar.gz, .tgz) or a manifest of image URLs (.txt)",
         spec_sets("concept", images={"uri": "https://photos.example.com/cat/"})),
    Case("images-volume-not-mounted", "images",
         "`concept.images: {claimName: concept-images, path: cat}`, no such volume under `PJ_VOLUMES_ROOT`",
         "concept image folder '{dir}/volumes/concept-images/cat' does not exist",
         volume_not_mounted),
    # ---- model ----
    Case("model-missing", "model", "`baseModel.path` names no folder",
         "baseModel.path '{dir}/nomodel' does not exist",
         spec_sets("baseModel", path="{dir}/nomodel")),
    Case("model-not-a-pipeline", "model", "`baseModel.path`: a folder without `model_index.json`",
         "baseModel.path '{dir}/model' is neither a diffusers pipeline folder (no model_index.json) nor a single "
         "checkpoint file (.safetensors, .ckpt)",
         model_folder({})),
    Case("model-broken", "model", "`baseModel.path`: `model_index.json` names a `unet` that has no files",
         "baseModel.path '{dir}/model' cannot be loaded as a Stable Diffusion 1.x/2.x pipeline: "
         "Error no file named config.json found in directory {dir}/model/unet.",
         model_folder({"model_index.json": TINY_INDEX})),
    Case("model-family-unsupported", "model", "`baseModel.path`: `model_index.json` names `KandinskyV22Pipeline`",
         "baseModel.path '{dir}/model': model family KandinskyV22Pipeline is not supported (supported: "
         "StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline (SDXL), "
         "StableDiffusion3Pipeline (SD3), FluxPipeline (FLUX.1))",
         model_folder({"model_index.json": '{"_class_name": "KandinskyV22Pipeline"}'})),
    Case("method-not-on-family", "model", "`method: textualInversion` on a FLUX.1 folder (`FluxPipeline`)",
         "method textualInversion is not supported on FLUX.1 (FluxPipeline); supported there: lora",
         model_folder({"model_index.json": FLUX_INDEX})),
    Case("option-not-on-family", "model", "`method: dreambooth`, `dreambooth.trainTextEncoder: true` on an SDXL folder",
         "dreambooth.trainTextEncoder is supported only on SD 1.x/2.x, not on SDXL",
         lambda ws: (model_folder({"model_index.json": SDXL_INDEX})(ws),
                     spec_sets("", method="dreambooth", dreambooth={"trainTextEncoder": True},
                               priorPreservation={"enabled": False})(ws))),
    Case("lora-text-encoder-not-on-family", "model", "`method: lora`, `lora.trainTextEncoder: true` on a FLUX.1 folder",
         "lora.trainTextEncoder is not supported on FLUX.1 (FluxPipeline); supported on: Stable Diffusion 1.x/2.x, SDXL",
         lambda ws: (model_folder({"model_index.json": FLUX_INDEX})(ws),
                     spec_sets("", method="lora", lora={"trainTextEncoder": True},
                               priorPreservation={"enabled": False})(ws))),
    Case("model-unknown-builtin", "model", "`baseModel: {builtin: sd15}`",
         "spec.baseModel.builtin: Input should be 'tiny-world'",
         spec_sets("", baseModel={"builtin": "sd15"})),
    Case("hub-id-missing", "model", "`baseModel.hubId: nobody/nothing`, unknown to the hub",
         "baseModel.hubId 'nobody/nothing' does not exist on the hub, or is private or gated "
         "(give the job an HF_TOKEN through baseModel.secretRef)",
         hub_model("nobody/nothing")),
    Case("hub-revision-missing", "model", "`baseModel: {hubId: tiny-org/tiny-sd, revision: v9}`, no such revision",
         "baseModel.revision 'v9' does not exist in 'tiny-org/tiny-sd'",
         hub_model("tiny-org/tiny-sd", "v9")),
    Case("hub-pickled-weights", "model", "`baseModel.hubId` whose cached UNet has only `.bin` (pickled) weights",
         "baseModel.hubId 'tiny-org/pickled': component 'unet' has no .safetensors weights; pickled weights "
         "(.bin) load only with baseModel.allowPickleWeights: true",
         hub_cache_with_pickled_weights),
    # ---- output ----
    Case("output-under-a-file", "output", "`--output {dir}/a-file/out`, `a-file` being a regular file",
         "output directory '{dir}/a-file/out' is not writable: Not a directory",
         output_under_a_file),
    Case("output-is-a-file", "output", "`--output` names an existing regular file",
         "output directory '{dir}/result' is not writable: File exists",
         output_is_a_file),
    Case("output-uri-denied", "output", "`output.uri: s3://results/runs/cat`, the store denies the Secret's keys",
         "output.uri 's3://results/runs/cat': access denied (check the credentials in the job's secretRef)",
         output_on_denying_store),
    # ---- resources / runtime ----
    Case("metrics-port-in-use", "resources", "`--metrics-port {port}` that another process listens on",
         "--metrics-port {port}: cannot serve /metrics on 0.0.0.0: Address already in use",
         metrics_port_taken),
    Case("metrics-port-out-of-range", "resources", "`--metrics-port 70000`",
         "--metrics-port 70000: not a TCP port number (0-65535)",
         args("--metrics-port", "70000")),
    Case("status-kubeconfig-missing", "resources", "`PJ_NAMESPACE`/`PJ_NAME` set, `KUBECONFIG` names no file",
         "cannot reach the Kubernetes API to report status of team-a/cat: Invalid kube-config file. No configuration found.",
         named_resource(KUBECONFIG="{dir}/no-kubeconfig")),
    Case("status-outside-a-pod", "resources", "`PJ_NAMESPACE`/`PJ_NAME` set, no `KUBECONFIG`, not in a pod",
         "cannot reach the Kubernetes API to report status of team-a/cat: Service host/port is not set.",
         named_resource()),
    Case("status-interval-not-a-number", "resources", "`PJ_NAMESPACE`/`PJ_NAME` set, `PJ_STATUS_INTERVAL=soon`",
         "PJ_STATUS_INTERVAL='soon' is not a number of seconds",
         named_resource(PJ_STATUS_INTERVAL="soon")),
    Case("clip-without-processor", "model",
         "`earlyStopping.criterion: clip`, `clip.modelPath: {dir}/clip` a `CLIPModel` folder without `preprocessor_config.json`",
         "earlyStopping.clip.modelPath '{dir}/clip' has no preprocessor_config.json: save the model's image processor "
         "with it (CLIPProcessor or CLIPImageProcessor save_pretrained into the same folder)",
         clip_folder_without_processor),
    # ---- artifact options (output.name, output.formats) ----
    Case("output-name-with-suffix", "output", "`output.name: mydog.safetensors`",
         "spec.output: name is a file stem: leave out the suffix (e.g. name: mydog gives mydog.safetensors)",
         spec_sets("", output={"name": "mydog.safetensors"})),
    Case("kohya-format-not-lora", "output", "`output.formats: [diffusers, kohya]` (textualInversion)",
         "spec: output.formats: kohya is a LoRA format; method textualInversion writes diffusers artifacts only",
         spec_sets("", output={"formats": ["diffusers", "kohya"]})),
    Case("kohya-format-not-on-family", "output", "`method: lora`, `output.formats: [diffusers, kohya]` on a FLUX.1 folder",
         "output.formats: kohya is not available on FLUX.1 (FluxPipeline); available on: Stable Diffusion 1.x/2.x, SDXL",
         lambda ws: (model_folder({"model_index.json": FLUX_INDEX})(ws),
                     spec_sets("", method="lora", output={"formats": ["diffusers", "kohya"]},
                               priorPreservation={"enabled": False})(ws))),
    # ---- caption files ----
    Case("caption-file-missing", "images", "`concept.captionSource: sidecar`, 3 images and no `.txt` beside them",
         "concept.captionSource sidecar: image '{dir}/images/red_striped_triangle_000.png' has no caption file "
         "'red_striped_triangle_000.txt' beside it (add one, or use captionSource: auto to train such images on "
         "the templates)",
         lambda ws: (images_at(folder_with({}, good_images=3))(ws),
                     ws.spec["concept"].update(captionSource="sidecar"))),
    Case("caption-file-empty", "images", "3 images, `red_striped_triangle_001.txt` beside one holds only blank lines",
         "caption file '{dir}/images/red_striped_triangle_001.txt' is empty (its first line is the image's caption)",
         images_at(folder_with({"red_striped_triangle_001.txt": b"\n  \n"}, good_images=3))),
    # ---- a base model as one checkpoint file ----
    Case("single-file-without-config", "model", "`baseModel.path: {dir}/model.safetensors`, no `baseModel.config`",
         "baseModel.path '{dir}/model.safetensors' is a single checkpoint file: set baseModel.config to a folder with "
         "the pipeline's config files (model_index.json, each component's config, scheduler and tokenizer), e.g. "
         "the base model's diffusers folder; nothing is downloaded",
         single_file_model("model.safetensors")),
    Case("single-file-ckpt-not-allowed", "model",
         "`baseModel: {path: {dir}/model.ckpt, config: {dir}/config}`, no `allowPickleWeights`",
         "baseModel.path '{dir}/model.ckpt' is a pickled checkpoint (.ckpt), which loads only with "
         "baseModel.allowPickleWeights: true (unpickling can run code); or convert it to .safetensors",
         single_file_model("model.ckpt", config={"model_index.json": TINY_INDEX})),
    Case("single-file-config-not-a-folder", "model",
         "`baseModel: {path: {dir}/model.safetensors, config: {dir}/config}`, `config` without `model_index.json`",
         "baseModel.config '{dir}/config' is not a pipeline config folder (no model_index.json)",
         single_file_model("model.safetensors", config={})),
    # ---- reporting ----
    Case("tracker-not-installed", "reporting", "`reporting.trackers: [wandb]` in an image without wandb",
         "reporting.trackers: wandb not installed in the trainer's image; install the extra personalization-job[wandb]",
         without_package("wandb", reporting={"trackers": ["wandb"]})),
]


# ---- the table ----------------------------------------------------------------------------------


def render_rows() -> str:
    return table.render_rows(PREFIX, [(c.area, c.input, f"`error: {c.message}`, exit 2") for c in CASES])


def documented_rows(text: str) -> str:
    """The trainer's rows as they are in the document."""
    return table.documented_rows(text, PREFIX)


def write_doc(path: Path = DOC) -> None:
    """Replace the trainer rows where they are, or append the trainer section; other text stays."""
    text = path.read_text()
    replaced = table.replace_rows(text, PREFIX, render_rows())
    path.write_text(replaced if replaced is not None else text.rstrip("\n") + "\n\n" + SECTION + HEADER + render_rows())
