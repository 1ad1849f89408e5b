"""A thin, path-based Kubernetes API client on top of the `kubernetes` package's ApiClient.

Objects stay plain dicts (no generated model classes): the builders produce dicts, the tests
compare dicts, and deserialising into models and back would only cost time. The ApiClient still
does what it is for: configuration (in-cluster or kubeconfig), auth headers, TLS, connection pool.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional
from urllib.parse import quote, urlencode

import kubernetes
import urllib3

from personalize import spec as api

logger = logging.getLogger(__name__)

# (apiVersion, kind) -> URL segment. Only what the operator creates or reads.
_PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("batch/v1", "Job"): "jobs",
    ("scheduling.k8s.io/v1", "PriorityClass"): "priorityclasses",
    (f"{api.API_GROUP}/{api.API_VERSION}", api.KIND): api.PLURAL,
}

MERGE_PATCH = "application/merge-patch+json"

# Answers that say "try again later" rather than "no": throttling (429), server-side trouble,
# and NO_ANSWER (the request timed out or the connection failed: the server may be restarting).
NO_ANSWER = 0
RETRYABLE_STATUSES = frozenset({NO_ANSWER, 429, 500, 502, 503, 504})


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str, retry_after: Optional[float] = None):
        self.status = status
        # Seconds the server asked us to wait (Retry-After header or the Status' retryAfterSeconds).
        self.retry_after = retry_after
        try:
            parsed = json.loads(body)
            self.reason = parsed.get("reason", "")
            message = parsed.get("message", body)
            if self.retry_after is None and (parsed.get("details") or {}).get("retryAfterSeconds") is not None:
                self.retry_after = float(parsed["details"]["retryAfterSeconds"])
        except (ValueError, AttributeError):
            self.reason, message = "", body
        super().__init__(f"{method} {path}: HTTP {status}: {message}"[:2000])


def _retry_after(headers: Any) -> Optional[float]:
    value = (headers or {}).get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own back-off


def _field(obj: dict, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def collection_path(api_version: str, kind: str, namespace: Optional[str]) -> str:
    plural = _PLURALS[(api_version, kind)]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is None:
        return f"{root}/{plural}"
    return f"{root}/namespaces/{quote(namespace)}/{plural}"


def object_path(api_version: str, kind: str, namespace: Optional[str], name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


class Kube:
    """`retries` extra attempts for 429/5xx answers and for requests without an answer within
    `timeout` seconds, waiting `backoff` x 2^n seconds (capped at `max_backoff`, or what the
    server's Retry-After asks for, whichever is longer). Retrying is safe for every verb the
    operator uses: merge patches are idempotent, a repeated DELETE gets 404 (treated as done), and
    a repeated POST whose first attempt did land gets 409, which `reconcile.create_children`
    resolves by checking that the existing object is ours.

    The timeout matters beyond the one call: callers hold a per-resource lock while they talk to
    the API server (status.update), so a hung request would block every writer of that resource."""

    def __init__(self, client: kubernetes.client.ApiClient, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 8.0, timeout: float = 30.0):
        self.client = client
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout

    @classmethod
    def from_environment(cls, **retry_options: Any) -> "Kube":
        """In-cluster service account if available, else the kubeconfig ($KUBECONFIG)."""
        try:
            kubernetes.config.load_incluster_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
        except kubernetes.config.ConfigException:
            configuration = kubernetes.client.Configuration()
            # $KUBECONFIG is read here, not when `kubernetes.config` was imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)
        return cls.for_configuration(configuration, **retry_options)

    @classmethod
    def for_configuration(cls, configuration: kubernetes.client.Configuration, **retry_options: Any) -> "Kube":
        """One retry policy, ours: urllib3 keeps retrying failed connections but hands every
        HTTP answer (429/503 with Retry-After included) back to `request`."""
        configuration.retries = urllib3.Retry(total=None, connect=3, read=0, status=0, redirect=0,
                                              respect_retry_after_header=False, raise_on_status=False)
        return cls(kubernetes.client.ApiClient(configuration), **retry_options)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: Optional[dict[str, str]] = None) -> Any:
        """One API call, retried with exponential back-off while the server answers 429/5xx."""
        for attempt in range(self.retries + 1):
            try:
                return self._request_once(method, path, body, content_type, query)
            except ApiError as err:
                if err.status not in RETRYABLE_STATUSES or attempt == self.retries:
                    raise
                delay = max(min(self.backoff * 2 ** attempt, self.max_backoff), err.retry_after or 0.0)
                logger.warning("%s; retry %d of %d in %.1f s", err, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, body: Any, content_type: str,
                      query: Optional[dict[str, str]]) -> Any:
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        try:
            response = self.client.call_api(method, url, header_params=headers, body=body,
                                            _request_timeout=self.timeout)
            data = response.read()
        except urllib3.exceptions.HTTPError as err:  # timeouts, refused or dropped connections
            raise ApiError(NO_ANSWER, method, path, f"no answer within {self.timeout:g} s: {err}") from None
        if not 200 <= response.status < 300:
            raise ApiError(response.status, method, path, data.decode(errors="replace"),
                           retry_after=_retry_after(response.getheaders()))
        return json.loads(data) if data else None

    # ---- verbs -------------------------------------------------------------------------------

    def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        """The object, or None if it does not exist."""
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: Optional[str] = None,
             label_selector: Optional[dict[str, str]] = None,
             field_selector: Optional[dict[str, str]] = None) -> list[dict]:
        """Objects whose labels and (dotted) fields equal the selectors' values."""
        query = {}
        if label_selector:
            query["labelSelector"] = ",".join(f"{k}={v}" for k, v in label_selector.items())
        if field_selector:
            query["fieldSelector"] = ",".join(f"{k}={v}" for k, v in field_selector.items())
        items = self.request("GET", collection_path(api_version, kind, namespace), query=query or None)["items"]
        # Also filter here: cheap, and correct against servers that ignore selectors.
        return [o for o in items
                if all(o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in (label_selector or {}).items())
                and all(_field(o, k) == v for k, v in (field_selector or {}).items())]

    def create(self, obj: dict) -> dict:
        meta = obj["metadata"]
        return self.request("POST", collection_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), obj)

    def patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: dict,
              subresource: Optional[str] = None) -> dict:
        path = object_path(api_version, kind, namespace, name)
        if subresource:
            path = f"{path}/{subresource}"
        return self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    def delete(self, api_version: str, kind: str, namespace: Optional[str], name: str,
               propagation: str = "Background") -> bool:
        """Delete; False if it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name), body)
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True
