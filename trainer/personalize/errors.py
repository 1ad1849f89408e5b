"""Errors the trainer reports to the user as one line (`error: ...`, exit code 2), no traceback."""


class TrainerInputError(ValueError):
    """Bad input the user can fix: images, model path, token, output directory, ..."""
