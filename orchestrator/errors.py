"""User-facing errors: each message names the file, key or value and what was expected."""


class OrchError(Exception):
    """Base of every error caused by user input; the CLI prints it as one line."""

    exit_code = 2


class TopologyError(OrchError):
    """A topology YAML file is invalid."""


class CheckpointError(OrchError):
    """A model checkpoint or converted shard is missing, corrupt or unsupported."""


class PlanError(OrchError):
    """The topology cannot be planned (model does not fit, not enough GPUs...)."""


class EngineMismatchError(OrchError):
    """A built engine does not match the GPU or software stack it is loaded on."""


class RuntimeFailure(OrchError):
    """A runtime failure (a phase, node or rank failed); exit code 1."""

    exit_code = 1
