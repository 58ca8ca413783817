"""The errors loraforge raises for bad input: each says where, what was seen, and the fix."""


class LoraforgeError(Exception):
    """Base of every error meant for the user rather than a traceback."""


class ConfigError(LoraforgeError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in config"
        if source:
            head += f" {source}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class DataError(LoraforgeError):
    """A data file that cannot be used as it is; the message names file, line and field."""


class ModelError(LoraforgeError):
    """A model that cannot be found or loaded."""


class RunDirError(LoraforgeError):
    """A run directory that is missing, incomplete, or already holds a run."""


class ExportError(LoraforgeError):
    """A merge or export that cannot be done as asked; says what to change."""


class TrainingStopped(LoraforgeError):
    """Training ended early: interrupted by a signal, stopped by a non-finite loss, or one of its processes failed."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(LoraforgeError):
    """A command other than training stopped by SIGINT or SIGTERM, having cleaned up what it was writing."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = 130 if signal_name == "SIGINT" else 143
