"""The one exception type of ``fastpeft train``."""


class TrainError(Exception):
    """A user-facing problem (bad argument, missing file, bad data row): printed without a traceback."""


class TrainInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step whose checkpoint was saved (exit status 130)."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        super().__init__(f"{signal_name} at step {step}: checkpoint saved to {checkpoint}; "
                         "run the same command with --resume to continue")
        self.step, self.checkpoint = step, checkpoint
