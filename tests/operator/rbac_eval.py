"""A tiny RBAC evaluator: does a Role allow a request? (Kubernetes' rules, for one Role.)

A request is allowed if some rule matches all of: apiGroups (or "*"), resources (or "*"; a
subresource is named "plural/sub" and is NOT matched by "plural"), verbs (or "*"), and
resourceNames (an empty list matches every name; a non-empty list never matches a request
without a name, such as list, watch or create).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str  # "plural" or "plural/subresource"
    name: Optional[str] = None  # None for list/watch/create/deletecollection


def _matches(values: list[str], value: str) -> bool:
    return "*" in values or value in values


def rule_allows(rule: dict, request: Request) -> bool:
    if not _matches(rule.get("apiGroups") or [], request.group):
        return False
    resources = rule.get("resources") or []
    plural = request.resource.split("/", 1)[0]
    subresource_wildcard = "/" in request.resource and f"{plural}/*" in resources
    if not (_matches(resources, request.resource) or subresource_wildcard):
        return False
    if not _matches(rule.get("verbs") or [], request.verb):
        return False
    names = rule.get("resourceNames") or []
    if names:
        return request.name is not None and request.name in names
    return True


def allows(role: dict, request: Request) -> bool:
    return any(rule_allows(rule, request) for rule in role.get("rules") or [])
