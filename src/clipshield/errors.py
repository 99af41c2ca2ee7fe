"""The failures a stage reports as one line (stage.run), in a module that imports nothing: catching them must not
load the code that raises them (a DVC stage depends on every module it imports)."""


class DataError(ValueError):
    """A data set is missing, empty or corrupt; the message says how to fix it."""


class ModelError(ValueError):
    """A model name, folder or weight file is wrong; the message says how to fix it."""


class TrainingError(RuntimeError):
    pass


class RemoteError(RuntimeError):
    """A dvc push/pull/get failed; the message says how to configure the remote."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (`how`), with what a stopped training run left behind (`note`) and what rerunning the
    stage will do (`rerun`); stage.run prints them."""

    def __init__(self, how: str = "interrupted", note: str = "", rerun: str = ""):
        super().__init__(how)
        self.how, self.note, self.rerun = how, note, rerun
