"""`personalization-operator`: kopf in standalone mode, a liveness endpoint, a metrics server.

Configured by PJ_* environment variables (`Settings`), not by options. In a pod
(KUBERNETES_SERVICE_HOST set) it keeps retrying until the API server answers; elsewhere a
missing kubeconfig is one `error:` line and exit status 2, not a silent retry loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Mapping, Optional

import kopf
import kubernetes
import yaml

import personalize

from . import handlers  # noqa: F401  (registers the handlers with kopf)
from . import metrics
from .settings import OPERATOR_NAME, Settings

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    variables = ", ".join(f"PJ_{field.name.upper()}" for field in dataclasses.fields(Settings))
    parser = argparse.ArgumentParser(
        prog=OPERATOR_NAME,
        description="Run the PersonalizationJob operator (kopf) against the current Kubernetes cluster: "
                    "in a pod its service account, elsewhere the kubeconfig ($KUBECONFIG or ~/.kube/config).",
        epilog=f"Settings come from environment variables (docs/operator.md): {variables}.",
    )
    parser.add_argument("--version", action="version", version=f"{OPERATOR_NAME} {personalize.version()}")
    return parser


def cluster_access_problem(env: Mapping[str, str]) -> Optional[str]:
    """Why the operator has no cluster to talk to, or None. Only outside a pod: in one, the
    service account is there and the API server may just be slow to answer, so kopf retries."""
    if env.get("KUBERNETES_SERVICE_HOST"):
        return None
    kubeconfig = env.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        # Into a throw-away configuration: kopf does its own login.
        kubernetes.config.load_kube_config(config_file=kubeconfig,
                                           client_configuration=kubernetes.client.Configuration())
    except (kubernetes.config.ConfigException, OSError, ValueError, KeyError, yaml.YAMLError) as err:
        return (f"no Kubernetes cluster: not in a pod (KUBERNETES_SERVICE_HOST unset) and no usable "
                f"kubeconfig at {kubeconfig} ({err or type(err).__name__})")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    problem = cluster_access_problem(os.environ)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    kopf.run(
        standalone=settings.standalone,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
