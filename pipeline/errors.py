"""The one exception type the stage CLIs turn into a one-line error and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or configuration. The message names the file, row or key at fault."""
