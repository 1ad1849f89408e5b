"""Errors the trainer reports to the user as one line (`error: ...`, exit code 2), no traceback."""


class TrainerInputError(ValueError):
    """Bad input the user can fix: images, model path, token, output directory, ..."""


class CheckpointError(TrainerInputError):
    """A checkpoint cannot be used; the message says which one and why (one line)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or fails its checksum."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by a run with a different spec."""
