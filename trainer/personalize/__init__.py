"""The trainer package; `personalize.spec` (the API model) is shared with the operator."""

from importlib import metadata

DISTRIBUTION = "personalization-job"


def version() -> str:
    """The installed project's version (pyproject.toml), printed by both CLIs' `--version`."""
    return metadata.version(DISTRIBUTION)
