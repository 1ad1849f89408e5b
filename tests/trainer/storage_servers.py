"""Real servers on 127.0.0.1 for the object-store, https and hub tests (no network needed).

- `MotoS3`: moto's S3 server in its own process, the endpoint the trainer reaches through
  AWS_ENDPOINT_URL. `MotoS3(strict=True)` enforces credentials (moto's IAM check from the first
  request), so made-up keys are denied as a real store would deny them.
- `FaultyProxy`: an HTTP proxy in front of it that can cut uploads (PUT/POST) after N of them,
  as a store outage in the middle of an upload would.
- `HttpsFiles`: a TLS file server with a self-signed certificate (clients trust it through
  SSL_CERT_FILE), serving a folder.
- `FakeHub`: answers every hub API call with 404 and the hub's X-Error-Code for an unknown
  repository or revision.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

ACCESS_KEY = "AKIATESTEXAMPLEKEY01"
SECRET_KEY = "s3cr3t-Test-Value-That-Must-Never-Be-Logged"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class MotoS3:
    def __init__(self, strict: bool = False):
        self.port = free_port()
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("AWS_"):
                del env[name]
        if strict:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        _wait_until_listening(self.port, self.proc)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS environment a job's Secret would give the trainer."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


_SHARED: dict[bool, MotoS3] = {}


def shared_moto(strict: bool = False) -> MotoS3:
    """One server per kind for the whole test session (stopped when the interpreter exits)."""
    if strict not in _SHARED:
        import atexit

        _SHARED[strict] = MotoS3(strict=strict)
        atexit.register(_SHARED[strict].close)
    return _SHARED[strict]


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_ProxyServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        proxy = self.server.owner
        if self.command in ("PUT", "POST"):
            with proxy.lock:
                proxy.writes += 1
                proxy.paths.append(self.path.split("?", 1)[0])
                cut = proxy.fail_writes_after is not None and proxy.writes > proxy.fail_writes_after
            if cut:  # the store is gone mid-upload: close the connection without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        # A HEAD answer has no body but announces the object's length.
        self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class BackgroundServer:
    """An HTTP server (`self.server`) answering on a daemon thread until `close()`."""

    server: http.server.HTTPServer

    def serve_in_background(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: "FaultyProxy"


class FaultyProxy(BackgroundServer):
    """Forwards to 127.0.0.1:upstream_port; after `fail_writes_after` writes, cuts the rest."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.writes = 0
        self.paths: list[str] = []  # the path of every write, in order
        self.fail_writes_after: int | None = None
        self.server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.owner = self
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.serve_in_background()


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class HttpsFiles(BackgroundServer):
    """Serves `root` over TLS on 127.0.0.1; `cert` is the file clients must trust."""

    def __init__(self, root: Path, cert_dir: Path):
        self.cert, key = self_signed_certificate(cert_dir)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietFiles, directory=str(root)))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.serve_in_background()


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    known_repo = "tiny-org/tiny-sd"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        # /api/models/<org>/<name>/revision/<revision>: the repository exists, its revisions do not.
        code = "RevisionNotFound" if self.path.startswith(f"/api/models/{self.known_repo}/") else "RepoNotFound"
        body = b'{"error": "not found"}'
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET


class FakeHub(BackgroundServer):
    """A hub endpoint that knows one repository (`_HubHandler.known_repo`) and none of its revisions."""

    def __init__(self):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.serve_in_background()


def build_hub_cache(hub_cache: Path, repo_id: str, pipeline_dir: Path, commit: str, refs: dict[str, str] | None = None,
                    pickled: bool = False) -> Path:
    """The Hugging Face cache layout of `repo_id` at `commit`, made from a local pipeline folder:
    `models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> blob symlinks, refs/<name>}`.
    `pickled`: the UNet's weights as a torch pickle (.bin) instead of safetensors."""
    import hashlib
    import shutil

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    staging = hub_cache / f".staging-{commit}"
    shutil.copytree(pipeline_dir, staging)
    if pickled:
        import torch
        from safetensors.torch import load_file

        weights = staging / "unet" / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(weights), staging / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.rmtree(staging)
    (repo / "refs").mkdir(exist_ok=True)
    for name, target in (refs or {"main": commit}).items():
        (repo / "refs" / name).write_text(target)
    return snapshot
