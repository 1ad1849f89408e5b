"""A thin, path-based Kubernetes API client on top of the `kubernetes` package's ApiClient.

Objects stay plain dicts (no generated model classes): the builders produce dicts, the tests
compare dicts, and deserialising into models and back would only cost time. The ApiClient still
does what it is for: configuration (in-cluster or kubeconfig), auth headers, TLS, connection pool.
"""

from __future__ import annotations

import json
import os
import logging
from typing import Any, Optional
from urllib.parse import quote, urlencode

import kubernetes

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


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, body: str):
        self.status = status
        try:
            self.reason = json.loads(body).get("reason", "")
            message = json.loads(body).get("message", body)
        except ValueError:
            self.reason, message = "", body
        super().__init__(f"{method} {path}: HTTP {status}: {message}"[:2000])


def collection_path(api_version: str, kind: str, namespace: Optional[str]) -> str:
    plural = _PLURALS[(api_version, kind)]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespace is None:
        return f"{root}/{plural}"
    return f"{root}/namespaces/{quote(namespace)}/{plural}"


def object_path(api_version: str, kind: str, namespace: Optional[str], name: str) -> str:
    return f"{collection_path(api_version, kind, namespace)}/{quote(name)}"


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient):
        self.client = client

    @classmethod
    def from_environment(cls) -> "Kube":
        """In-cluster service account if available, else the kubeconfig ($KUBECONFIG)."""
        try:
            kubernetes.config.load_incluster_config()
            configuration = kubernetes.client.Configuration.get_default_copy()
        except kubernetes.config.ConfigException:
            configuration = kubernetes.client.Configuration()
            # $KUBECONFIG is read here, not when `kubernetes.config` was imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: Optional[dict[str, str]] = None) -> Any:
        if query:
            path = f"{path}?{urlencode(query)}"
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, headers, body, _ = self.client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        response = self.client.call_api(method, url, header_params=headers, body=body)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiError(response.status, method, path, data.decode(errors="replace"))
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
             label_selector: Optional[dict[str, str]] = None) -> list[dict]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in label_selector.items())} if label_selector else None
        items = self.request("GET", collection_path(api_version, kind, namespace), query=query)["items"]
        if label_selector:
            # Also filter here: cheap, and correct against servers that ignore selectors.
            items = [o for o in items
                     if all(o.get("metadata", {}).get("labels", {}).get(k) == v for k, v in label_selector.items())]
        return items

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
