"""`personalization-operator`: kopf in standalone mode, a liveness endpoint, a metrics server."""

from __future__ import annotations

import logging

import kopf

from . import handlers  # noqa: F401  (registers the handlers with kopf)
from . import metrics
from .settings import Settings


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    kopf.run(
        standalone=settings.standalone,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )


if __name__ == "__main__":
    main()
