"""A URI as an fsspec filesystem, the retry rule for talking to it, and which failures are the user's.

`open_location("s3://bucket/prefix/")` gives a `Location`: the filesystem (s3fs, gcsfs or
fsspec's HTTP) and the root path inside it. S3-compatible stores (MinIO, Ceph, moto) are reached
through `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), as the AWS SDKs do.

Failures fall in two kinds:
- the user's (`TrainerInputError`, exit 2, never retried): a bucket or key that does not exist,
  credentials that are missing or denied;
- transient (connection resets, timeouts, 5xx): retried `PJ_STORAGE_RETRIES` times (default 5)
  with exponential backoff from `PJ_STORAGE_BACKOFF` seconds (default 1), then raised as
  `StorageUnavailable`, which is not bad input: the Job's next pod tries again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from personalize.errors import TrainerInputError

log = logging.getLogger("personalize.storage")

T = TypeVar("T")

# The SDKs' debug logs print request headers, and an Authorization header names the access key:
# keep them at WARNING whatever the root level is.
for _name in ("botocore", "aiobotocore", "boto3", "s3transfer", "s3fs", "gcsfs", "google.auth", "urllib3", "httpx",
              "huggingface_hub"):
    logging.getLogger(_name).setLevel(logging.WARNING)

RETRIES_ENV = "PJ_STORAGE_RETRIES"
BACKOFF_ENV = "PJ_STORAGE_BACKOFF"
HTTP_DENIED = (401, 403)


class StorageUnavailable(RuntimeError):
    """The store did not answer after all retries (not the user's input: retry the pod)."""


@dataclass(frozen=True)
class Location:
    uri: str  # as the user wrote it (never holds credentials: the spec refuses those)
    scheme: str
    fs: Any  # fsspec.AbstractFileSystem
    root: str  # the path inside `fs` ("bucket/prefix" or the https URL), without a trailing slash

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def child(self, relative: str) -> str:
        """The filesystem path of `relative` under the root."""
        return f"{self.root}/{relative}" if relative else self.root

    def uri_of(self, path: str) -> str:
        """The URI of a filesystem path, for messages."""
        return path if self.scheme == "https" else f"{self.scheme}://{path}"


def _s3_filesystem() -> Any:
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    if os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = os.environ["AWS_DEFAULT_REGION"]
    # A fresh instance (fsspec caches them by arguments, not by environment) without listing cache:
    # the trainer re-lists after its own writes.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False)


def _gcs_filesystem() -> Any:
    import gcsfs

    # token=None: GOOGLE_APPLICATION_CREDENTIALS, else the metadata server (GKE workload identity).
    return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


def _http_filesystem() -> Any:
    import ssl

    from fsspec.implementations.http import HTTPFileSystem

    # A context made now honours SSL_CERT_FILE / SSL_CERT_DIR as set for this job (a private CA).
    return HTTPFileSystem(skip_instance_cache=True, ssl=ssl.create_default_context())


FILESYSTEMS: dict[str, Callable[[], Any]] = {"s3": _s3_filesystem, "gs": _gcs_filesystem, "https": _http_filesystem}


def open_location(uri: str, field: str) -> Location:
    """The filesystem behind `uri` (`field` names the spec field in messages)."""
    scheme, _, rest = uri.partition("://")
    if scheme not in FILESYSTEMS:
        raise TrainerInputError(f"{field} {uri!r}: scheme {scheme!r} is not supported ({', '.join(FILESYSTEMS)})")
    root = uri.rstrip("/") if scheme == "https" else rest.strip("/")
    if scheme != "https" and not root:
        raise TrainerInputError(f"{field} {uri!r}: names no bucket")
    return Location(uri=uri, scheme=scheme, fs=FILESYSTEMS[scheme](), root=root)


def _http_status(err: BaseException) -> int | None:
    status = getattr(err, "status", None) or getattr(err, "code", None)
    return status if isinstance(status, int) else None


def user_error(err: BaseException, where: str) -> str | None:
    """The message, when the failure is the user's (missing object/bucket, denied credentials).

    Built from the kind of error only: the libraries' own texts may quote request details."""
    if isinstance(err, TrainerInputError):
        return str(err)
    cause = err.__cause__
    if isinstance(err, FileNotFoundError) and cause is not None and not isinstance(cause, FileNotFoundError):
        # fsspec's HTTP filesystem reports every failed HEAD as FileNotFoundError: judge its cause
        # (a 404, a 403, or a connection failure that is worth retrying).
        status = _http_status(cause)
        if status == 404:
            return f"{where} does not exist"
        if status is not None:
            return user_error(cause, where)
        if _transient(cause):
            return None
    if isinstance(err, PermissionError) or _http_status(err) in HTTP_DENIED:
        return f"{where}: access denied (check the credentials in the job's secretRef)"
    if isinstance(err, FileNotFoundError) or _http_status(err) == 404:
        return f"{where} does not exist"
    try:  # botocore reports missing/invalid credentials before any request is sent
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return f"{where}: no credentials (set secretRef, or give the pod a workload identity)"
    except ImportError:
        pass
    return None


def _transient_types() -> tuple[type, ...]:
    """Connection failures of the libraries underneath (they do not all derive from OSError)."""
    types: list[type] = [OSError, TimeoutError]
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [HTTPClientError, BotoConnectionError]
    except ImportError:
        pass
    return tuple(types)


def _transient(err: BaseException) -> bool:
    return isinstance(err, _transient_types())


def _float_env(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise TrainerInputError(f"{name}={os.environ[name]!r} is not a number") from None


def with_retries(what: str, call: Callable[[], T], *, where: str) -> T:
    """`call()`, retried on transient failures; the user's failures become one-line input errors.

    `what` says what was attempted ("list", "download", ...), `where` is the URI for messages.
    """
    retries = int(_float_env(RETRIES_ENV, 5))
    backoff = _float_env(BACKOFF_ENV, 1.0)
    attempt = 0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted into the user's, transient, or a bug below
            problem = user_error(err, where)
            if problem is not None:
                raise TrainerInputError(problem) from None
            if not _transient(err):
                raise
            if attempt >= retries:
                raise StorageUnavailable(
                    f"{what} {where} failed after {attempt + 1} attempts: {type(err).__name__}: {_first_line(err)}"
                ) from err
            delay = backoff * 2**attempt
            log.warning("%s %s failed (%s), retrying in %.1f s", what, where, type(err).__name__, delay)
            time.sleep(delay)
            attempt += 1


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]
