"""The one exception every reader raises for bad training data."""

from __future__ import annotations


class DataError(ValueError):
    """Training data that cannot be used: a missing file, a wrong shape, a corrupt archive, NaN features,
    a pickle holding anything but arrays. The message names the file and the problem.

    It takes exactly one message argument on purpose: torch's DataLoader re-raises a worker's exception in
    the main process as `type(exc)(message_with_worker_traceback)`, so a DataError raised in a worker
    surfaces as a DataError (not a RuntimeError) that still names the file.
    """
