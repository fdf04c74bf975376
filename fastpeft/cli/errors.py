"""The one exception type of ``fastpeft train``."""


class TrainError(Exception):
    """A user-facing problem (bad argument, missing file, bad data row): printed without a traceback."""
