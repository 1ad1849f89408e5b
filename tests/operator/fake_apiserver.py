"""A stricter kmock: what a real API server would refuse, it refuses (and remembers).

kmock stores whatever it receives. Real API servers:
- assign metadata.uid, creationTimestamp, resourceVersion, generation (bumped on spec changes);
- separate the status subresource: a PATCH of /status changes only status, a PATCH of the main
  resource never changes status;
- validate every object: builtin kinds against their OpenAPI schema (here: kubernetes-validate's
  strict schemas, which also reject unknown fields like `kubectl --validate=strict`), custom
  resources against the CRD's openAPIV3Schema (here: jsonschema on the generated CRD).
Refused requests get HTTP 422 and are recorded in `violations`; tests assert it stays empty.

Builtin kinds are checked against the oldest and the newest Kubernetes version we support
(K8S_VERSIONS): a field that one of them lacks or requires differently is caught.

Faults are scripted per test (`inject`, `expire_watches`): HTTP errors such as 409/429/500 for
matching requests from the operator (never for the harness), requests that hang before they are
answered, and watch streams that end with the "410 Gone" ERROR event a real API server sends
when a resourceVersion is too old.

Further real behaviours that kmock lacks:
- the garbage collector runs asynchronously: `gc_delay` seconds after an object is deleted, its
  dependents (ownerReferences to no live uid) are deleted, then theirs (`gc_paused` holds it);
- a body with NaN or Infinity is not JSON: 400 Bad Request;
- `labelSelector` (equality terms) and `fieldSelector` (equality on dotted paths) filter lists
  and watch streams; `timeoutSeconds` ends a watch stream, as the server's own timeout does;
- a merge patch that names `metadata.resourceVersion` is refused with 409 unless it is current
  (optimistic concurrency).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import aiohttp.web
import attrs
import jsonschema
import kmock
import kubernetes_validate
import referencing
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import enums as kmock_enums

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "personalizationjobs.yaml"
# The oldest and the newest Kubernetes minor version the operator's manifests must be valid for.
K8S_VERSIONS = ("1.28.0", "1.37.0")

# Resources the operator and the tests use that kmock's bundled discovery lacks.
EXTRA_RESOURCES = {
    "batch/v1/jobs": ("Job", True, {"status"}),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, set()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, set()),
    "scheduling.k8s.io/v1/priorityclasses": ("PriorityClass", False, set()),
    "personalization.dvar.dev/v1alpha1/personalizationjobs": ("PersonalizationJob", True, {"status"}),
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
STATUS_SUBRESOURCE = {"pods", "jobs", "personalizationjobs"}


class SchemaViolation(Exception):
    pass


# ---- builtin kinds: kubernetes-validate's strict schemas, loaded once -------------------------

_SCHEMA_ROOTS = {version: Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                 / f"v{version}-local-strict" for version in K8S_VERSIONS}
_validators: dict[tuple[str, str, str], jsonschema.protocols.Validator] = {}
_definitions: dict[str, referencing.Resource] = {}


def builtin_validator(api_version: str, kind: str, k8s_version: str):
    key = (k8s_version, api_version, kind)
    if key not in _validators:
        root = _SCHEMA_ROOTS[k8s_version]
        group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
        schema = json.loads((root / f"{kind.lower()}-{group_version}.json").read_text())
        if k8s_version not in _definitions:
            _definitions[k8s_version] = referencing.Resource.from_contents(
                json.loads((root / "_definitions.json").read_text()))
        registry = referencing.Registry().with_resources([("_definitions.json", _definitions[k8s_version])])
        registry = (referencing.Resource.from_contents(schema) @ registry).crawl()  # crawl once, not per $ref
        _validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return _validators[key]


# ---- custom resources: the CRD's openAPIV3Schema as JSON Schema ------------------------------


def openapi_to_jsonschema(node: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Structural OpenAPI v3 -> JSON Schema. strict: unknown fields are errors (field validation)."""
    out: dict[str, Any] = {}
    kind = node.get("type")
    nullable = node.get("nullable", False)
    if kind:
        out["type"] = [kind, "null"] if nullable else kind
    for key in ("minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "required"):
        if key in node:
            out[key] = node[key]
    if "enum" in node:
        out["enum"] = list(node["enum"]) + ([None] if nullable else [])
    if node.get("exclusiveMinimum"):
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum"):
        out["exclusiveMaximum"] = out.pop("maximum")
    if "properties" in node:
        out["properties"] = {k: openapi_to_jsonschema(v, strict) for k, v in node["properties"].items()}
        if strict and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = openapi_to_jsonschema(node["additionalProperties"], strict)
    if "items" in node:
        out["items"] = openapi_to_jsonschema(node["items"], strict)
    return out


def load_crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


def crd_validator(crd: dict[str, Any]):
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft202012Validator(openapi_to_jsonschema(schema))


def validate_custom(obj: dict[str, Any], validator, max_name: int = 63) -> None:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        raise SchemaViolation("; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))
    # The CRD's x-kubernetes-validations rule (CEL) on the name.
    if len(obj.get("metadata", {}).get("name", "")) > max_name:
        raise SchemaViolation(f"metadata.name: longer than {max_name}")


def validate_builtin(obj: dict[str, Any]) -> None:
    """Valid for every version in K8S_VERSIONS, or SchemaViolation naming the version."""
    for k8s_version in K8S_VERSIONS:
        try:
            validator = builtin_validator(obj["apiVersion"], obj["kind"], k8s_version)
        except FileNotFoundError:
            raise SchemaViolation(f"unknown kind {obj.get('apiVersion')}/{obj.get('kind')}") from None
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            raise SchemaViolation(f"Kubernetes {k8s_version}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]))


# ---- selectors -----------------------------------------------------------------------------------


def _field(obj: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def selected(obj: dict[str, Any], params) -> bool:
    """Whether `obj` matches the request's labelSelector and fieldSelector (equality terms, and
    `key!=value`; a bare `key` means the label exists), as the API server filters."""
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (params.get("labelSelector") or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    for term in filter(None, (params.get("fieldSelector") or "").split(",")):
        negate = "!=" in term
        key, value = term.split("!=", 1) if negate else term.replace("==", "=").split("=", 1)
        actual = _field(obj, key)
        if ((str(actual) if actual is not None else "") == value) == negate:
            return False
    return True


# ---- scripted faults --------------------------------------------------------------------------

# kmock's action names -> Kubernetes verbs.
_VERBS = {"CREATE": "create", "UPDATE": "patch", "FETCH": "get", "LIST": "list", "DELETE": "delete",
          "WATCH": "watch"}
_STATUS_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                   410: "Expired"}


@attrs.define(kw_only=True)
class Fault:
    """Answer the next `times` matching operator requests with HTTP `status` instead of serving them."""
    verb: str  # create, patch, get, list, delete
    plural: str
    status: int
    subresource: Optional[str] = None  # "status": only status-subresource requests; None: only main resource
    times: int = 1
    retry_after: Optional[int] = None  # seconds, sent as the Retry-After header
    # Which client: "operator" (anything but the harness), "kopf" (kopf's own client), "kube" (ours).
    client: str = "operator"
    # Seconds to wait before answering (then the request is served normally, status ignored):
    # an overloaded or partitioned API server. The client must give up on its own.
    hang: Optional[float] = None
    hits: int = 0

    def matches(self, request: kmock.Request, verb: str, user_agent: str) -> bool:
        if self.hits >= self.times or request.resource is None:
            return False
        if verb != self.verb or request.resource.plural != self.plural:
            return False
        if (request.subresource or None) != self.subresource:
            return False
        if user_agent.startswith(HARNESS_PREFIXES):
            return False
        is_kopf = user_agent.startswith("kopf")
        return self.client == "operator" or (self.client == "kopf") == is_kopf


# Requests from these clients are never faulted: the test harness and kmock itself.
HARNESS_PREFIXES = ("fake-cluster-harness", "kmock/")


# ---- the server -------------------------------------------------------------------------------


def _version(value: Any) -> int:
    """A resourceVersion as this server assigns them (a counter); 0 for none or another form."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


@attrs.define(kw_only=True)
class StrictApiServer(kmock.KubernetesEmulator):
    violations: list[str] = attrs.field(factory=list)
    # (plural, namespace, name) -> time.monotonic() when the create arrived (for benchmarks).
    created_at: dict[tuple[str, str, str], float] = attrs.field(factory=dict)
    # Every request in arrival order. kmock matches each new request against its own whole
    # request log (by identity, per reaction): O(all requests so far) per request. Answered
    # requests are dropped from kmock's log (`_retire`) so that it holds only those in flight.
    log: list = attrs.field(factory=list)
    _answered_ids: set = attrs.field(factory=set)
    # Namespaces that exist (kmock itself has no Namespace objects kopf could list).
    namespaces: set[str] = attrs.field(factory=lambda: {"default"})
    # plural -> (HTTP status, message): refuse that many next creations (quota, webhook...).
    refusals: dict[str, list[tuple[int, str]]] = attrs.field(factory=dict)
    # Scripted HTTP errors (see `inject`), and the ones that fired, as "verb plural[/sub] -> status".
    faults: list[Fault] = attrs.field(factory=list)
    fired: list[str] = attrs.field(factory=list)
    # plural -> how many times its watch streams were ended with 410 Gone.
    _expirations: dict[str, int] = attrs.field(factory=dict)
    # plural -> watch streams that were ended with 410 Gone.
    expired_streams: dict[str, int] = attrs.field(factory=dict)
    # The garbage collector: seconds between a deletion and the deletion of its dependents;
    # while paused, orphans stay (a busy kube-controller-manager) until `gc_paused` is cleared.
    gc_delay: float = 0.3
    gc_paused: bool = False
    # kmock starts every watch stream by sending every object as ADDED. A real API server given
    # a resourceVersion (kopf sends the last one it saw when a stream times out and it watches
    # again) sends only what changed after it. With `watches_resume`, objects not changed since
    # that version are left out (a deletion in between is still not told: use 410 for gaps).
    # Off for the tests; the steady-state benchmark turns it on, or every watch timeout would
    # replay thousands of objects through the operator's handlers.
    watches_resume: bool = False
    collected: list[str] = attrs.field(factory=list)
    _crd_validator: Any = attrs.field(default=None)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for path, (kind, namespaced, subresources) in EXTRA_RESOURCES.items():
            self.resources[path] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                      subresources=subresources)
        self._crd_validator = crd_validator(load_crd())

    def _validate(self, obj: dict[str, Any]) -> None:
        if obj.get("apiVersion", "").startswith("personalization.dvar.dev/"):
            validate_custom(obj, self._crd_validator)
        else:
            validate_builtin(obj)

    def _current(self, request: kmock.Request) -> Optional[dict[str, Any]]:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            return copy.deepcopy(self.objects[key].raw)
        return None

    def _admit_create(self, request: kmock.Request) -> None:
        obj = request.data
        meta = obj.setdefault("metadata", {})
        # Clients may omit apiVersion/kind (the URL says it); kopf does for Events.
        res = request.resource
        obj.setdefault("apiVersion", f"{res.group}/{res.version}" if res.group else res.version)
        obj.setdefault("kind", self.resources[res].kind)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace and not meta.get("namespace"):
            meta["namespace"] = request.namespace
        self.created_at[(res.plural, meta.get("namespace") or "", meta.get("name") or "")] = time.monotonic()
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        if request.resource.plural in STATUS_SUBRESOURCE and request.resource.plural != "pods":
            obj.pop("status", None)  # status is not settable on create (pods: the test is the kubelet)
        self._validate(obj)

    def _admit_patch(self, request: kmock.Request) -> None:
        current = self._current(request)
        patch = request.data
        if current is None or not isinstance(patch, dict):
            if isinstance(patch, list):
                raise SchemaViolation("JSON patches are not expected from the operator")
            return  # kmock answers 404
        if request.resource.plural in STATUS_SUBRESOURCE:
            if request.subresource == "status":
                for key in [k for k in patch if k != "status"]:
                    del patch[key]
            else:
                patch.pop("status", None)
        new = kmock_dicts.patch_dict(current, patch)
        meta_patch = patch.setdefault("metadata", {}) if isinstance(patch.get("metadata"), dict) or "metadata" not in patch else {}
        meta_patch["resourceVersion"] = str(next(self._versions))
        if new.get("spec") != current.get("spec"):
            meta_patch["generation"] = int(current["metadata"].get("generation", 1)) + 1
        new = kmock_dicts.patch_dict(current, patch)
        for immutable in ("uid", "creationTimestamp", "name", "namespace"):
            if new["metadata"].get(immutable) != current["metadata"].get(immutable):
                raise SchemaViolation(f"metadata.{immutable} is immutable")
        self._validate(new)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the cluster-scoped namespace collection (/api/v1/namespaces),
        # which kopf lists and watches when it serves specific namespaces. Serve it here from
        # `namespaces`; the watch stays open and silent.
        if raw_request.path == "/api/v1/namespaces":
            if raw_request.query.get("watch") in ("true", "1"):
                response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
                await response.prepare(raw_request)
                while True:
                    await asyncio.sleep(3600)
            names = sorted(self.namespaces)
            return aiohttp.web.json_response({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
                "items": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}} for n in names],
            })
        return await super().__call__(raw_request)

    @property
    def all_requests(self) -> list:
        """Every request, in arrival order."""
        return list(self.log)

    def _retire(self, request: kmock.Request) -> None:
        self._answered_ids.add(id(request))
        if len(self._answered_ids) >= 32:
            self._requests[:] = [r for r in self._requests if id(r) not in self._answered_ids]
            self._answered_ids.clear()

    # ---- scripted faults -----------------------------------------------------------------------

    def inject(self, verb: str, plural: str, status: int, times: int = 1, **options: Any) -> Fault:
        fault = Fault(verb=verb, plural=plural, status=status, times=times, **options)
        self.faults.append(fault)
        return fault

    def expire_watches(self, plural: str) -> None:
        """End every open watch stream of `plural` with an ERROR event, code 410 (Gone).

        Runs on the server's event loop (`FakeCluster.expire_watches` schedules it). Events
        that happen before the client watches again reach nobody, as on a real server: only a
        fresh LIST shows them."""
        self._expirations[plural] = self._expirations.get(plural, 0) + 1
        for resource, bus in list(self._buses.items()):
            if resource.plural == plural:
                # Wake the streams up; each one sees its expiration count moved and ends.
                asyncio.ensure_future(bus.put({"type": "PJ-TEST-EXPIRE", "object": {"metadata": {}}}))

    async def _serve_list(self, request: kmock.Request):
        listing = await super()._serve_list(request)
        listing["items"] = [o for o in listing["items"] if selected(o, request.params)]
        if self.watches_resume:  # the version to watch from: the newest in the listing (a later
            # change gets a higher one; an empty listing says 0, and its watch sends everything)
            listing["metadata"]["resourceVersion"] = str(max(
                (_version(o.get("metadata", {}).get("resourceVersion")) for o in listing["items"]), default=0))
        return listing

    async def _serve_watch(self, request: kmock.Request):
        plural = request.resource.plural if request.resource is not None else ""
        epoch = self._expirations.get(plural, 0)
        timeout = request.params.get("timeoutSeconds")
        deadline = time.monotonic() + float(timeout) if timeout else None
        if deadline is not None:
            # Wake the stream at its deadline even when nothing happens.
            self._loop_call_later(float(timeout), self._wake, request.resource)
        since = _version(request.params.get("resourceVersion")) if self.watches_resume else None
        async for event in super()._serve_watch(request):
            # kmock's replay at the stream's start is all ADDED; a live ADDED (a creation) always
            # has a newer version. Live MODIFIED/DELETED events pass whatever their version (kmock's
            # deletion mark on an object with finalizers keeps the old one).
            if since and isinstance(event, dict) and event.get("type") == "ADDED" and \
                    _version(((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")) <= since:
                continue  # seen by the client before this stream: a real server would not resend it
            if deadline is not None and time.monotonic() >= deadline:
                return  # the server's own timeout: the stream simply ends
            if isinstance(event, dict) and event.get("type") == "PJ-TEST-WAKE":
                continue
            if isinstance(event, dict) and isinstance(event.get("object"), dict) and event.get("type") in (
                    "ADDED", "MODIFIED", "DELETED") and not selected(event["object"], request.params):
                continue
            if self._expirations.get(plural, 0) != epoch:
                self.expired_streams[plural] = self.expired_streams.get(plural, 0) + 1
                yield {"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": "too old resource version"}}
                return
            if isinstance(event, dict) and event.get("type") == "PJ-TEST-EXPIRE":
                continue
            yield event

    def _loop_call_later(self, delay: float, callback, *args) -> None:
        asyncio.get_running_loop().call_later(delay, callback, *args)

    def _wake(self, resource) -> None:
        bus = self._buses.get(resource)
        if bus is not None:
            asyncio.ensure_future(bus.put({"type": "PJ-TEST-WAKE", "object": {"metadata": {}}}))

    # ---- the garbage collector -------------------------------------------------------------------

    def _schedule_gc(self) -> None:
        self._loop_call_later(self.gc_delay, lambda: asyncio.ensure_future(self.collect_garbage()))

    async def collect_garbage(self) -> list[str]:
        """One pass: delete every object whose owners (by uid) are all gone. A pass that deleted
        something schedules the next one (the dependents of what it deleted)."""
        if self.gc_paused:
            return []
        deleted = []
        async with self._lock:
            live = {o.raw.get("metadata", {}).get("uid") for o in self._objects.values() if not o.deleted}
            for (resource, namespace, name), obj in list(self._objects.items()):
                if obj.deleted:
                    continue
                owners = [ref.get("uid") for ref in obj.raw.get("metadata", {}).get("ownerReferences", [])]
                if owners and not any(uid in live for uid in owners):
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": obj.last.raw})
                    deleted.append(f"{obj.last.raw.get('kind')}/{name}")
        self.collected += deleted
        if deleted:
            self._schedule_gc()
        return deleted

    def resume_gc(self) -> None:
        """Unpause the collector and run it (on the server's loop)."""
        self.gc_paused = False
        asyncio.ensure_future(self.collect_garbage())

    # ---- real answers kmock does not give ------------------------------------------------------------

    @staticmethod
    def _non_finite_json(request: kmock.Request) -> Optional[aiohttp.web.Response]:
        """A real API server's JSON decoder refuses NaN/Infinity (they are not JSON)."""
        if not request.text:
            return None

        def refuse(constant: str):
            raise ValueError(f"{constant} is not valid JSON")

        try:
            json.loads(request.text, parse_constant=refuse)
        except ValueError as err:
            body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 400,
                    "reason": "BadRequest", "message": f"the body of the request was in an unknown format: {err}"}
            return aiohttp.web.json_response(body, status=400)
        return None

    @staticmethod
    def _bad_timeout(request: kmock.Request) -> Optional[aiohttp.web.Response]:
        """timeoutSeconds is an integer to a real API server ("300.0" is a 400)."""
        value = request.params.get("timeoutSeconds")
        if value is None or value.isdigit():
            return None
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 400,
                "reason": "BadRequest", "message": f"timeoutSeconds: invalid value {value!r}: not an integer"}
        return aiohttp.web.json_response(body, status=400)

    def _stale_resource_version(self, request: kmock.Request) -> bool:
        if request.action != kmock_enums.action.UPDATE or not isinstance(request.data, dict):
            return False
        wanted = (request.data.get("metadata") or {}).get("resourceVersion")
        if wanted is None:
            return False
        current = self._current(request)
        return current is not None and current["metadata"].get("resourceVersion") != wanted

    def _scripted_fault(self, request: kmock.Request) -> Optional[aiohttp.web.Response]:
        if request.action is None or request.action == kmock_enums.action.WATCH:
            return None
        verb = _VERBS.get(request.action.name, "")
        user_agent = request.headers.get("User-Agent", "")
        for fault in self.faults:
            if fault.matches(request, verb, user_agent) and fault.hang is None:
                fault.hits += 1
                target = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
                self.fired.append(f"{verb} {target} -> {fault.status}")
                reason = _STATUS_REASONS.get(fault.status, "Unknown")
                body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                        "code": fault.status, "reason": reason, "message": f"scripted fault: {reason}"}
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
                return aiohttp.web.json_response(body, status=fault.status, headers=headers)
        return None

    def _hang(self, request: kmock.Request) -> Optional[float]:
        if request.action is None or request.action == kmock_enums.action.WATCH:
            return None
        verb = _VERBS.get(request.action.name, "")
        for fault in self.faults:
            if fault.hang is not None and fault.matches(request, verb, request.headers.get("User-Agent", "")):
                fault.hits += 1
                self.fired.append(f"{verb} {request.resource.plural} -> hang {fault.hang:g} s")
                return fault.hang
        return None

    async def _handle(self, request: kmock.Request):
        self.log.append(request)
        try:
            hang = self._hang(request)
            if hang is not None:
                await asyncio.sleep(hang)
            fault = self._scripted_fault(request) or self._non_finite_json(request) or self._bad_timeout(request)
            if fault is not None:
                return fault
            if request.action == kmock_enums.action.WATCH:
                return await super()._handle(request)
            if self._stale_resource_version(request):
                raise kmock.KubernetesError(status=409, reason="Conflict", message=(
                    "the object has been modified; please apply your changes to the latest version and try again"))
            response = await self._handle_strictly(request)
            if request.action == kmock_enums.action.DELETE or (
                    request.action == kmock_enums.action.UPDATE and request.resource is not None
                    and self._current(request) is None):
                self._schedule_gc()  # something may be gone now (a finalizer removal, too)
            return response
        finally:
            self._retire(request)

    async def _handle_strictly(self, request: kmock.Request):
        if request.action == kmock_enums.action.CREATE and self.refusals.get(request.resource.plural):
            status, message = self.refusals[request.resource.plural].pop(0)
            raise kmock.KubernetesError(status=status, reason="Forbidden", message=message)
        if request.resource is not None and request.data is not None:
            try:
                if request.action == kmock_enums.action.CREATE:
                    self._admit_create(request)
                elif request.action == kmock_enums.action.UPDATE:
                    self._admit_patch(request)
            except SchemaViolation as err:
                where = f"{request.method.value} {request.url.path}"
                self.violations.append(f"{where}: {err}")
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"{where}: {err}") from None
        return await super()._handle(request)
