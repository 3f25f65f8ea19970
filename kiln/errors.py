"""Every error kiln raises on purpose, in one place.

A `KilnError` carries a message that names the culprit (the config field, or the file and
line), what is wrong and the fix; the CLI prints it as one line and exits with `exit_code`,
and a launched rank prints it once instead of a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    exit_code = 1


# what the user gave: exit code 2, nothing started or nothing left behind


class ConfigError(KilnError, ValueError):
    """A config value that cannot work; the message names the field, the values and a fix."""

    exit_code = 2


class InputError(KilnError, ValueError):
    """Bad input data; the message names the file, the line and the fix."""

    exit_code = 2


class RecordError(InputError):
    """A fine-tuning or alignment record that cannot be used."""


class TemplateError(InputError):
    """A chat template that cannot give an assistant-only loss mask."""


class CurationInputError(InputError):
    """Bad raw input under `strict`."""


class ReportError(InputError):
    """A run or pipeline `kiln report` cannot read, or an output it cannot write; names the path and the fix."""


class FormatError(InputError):
    """A checkpoint or weights file that is not what its format promises."""


class HFFormatError(FormatError):
    pass


class MegatronFormatError(FormatError):
    pass


class NemoFormatError(FormatError):
    pass


class SafetensorsError(FormatError):
    pass


# what happened while running: exit code 1


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint that cannot be saved or loaded; says which one is still good."""


class Divergence(KilnError, RuntimeError):
    """A NaN or Inf loss or gradient norm: the run stops and keeps its last good checkpoint."""


class ParityError(KilnError, RuntimeError):
    """A converted or exported model whose logits differ from its source's."""


class RegressionError(KilnError, RuntimeError):
    """An evaluation worse than its baseline by more than the tolerance (a CI gate)."""

    exit_code = 3


class EndpointError(KilnError, RuntimeError):
    """An inference endpoint that cannot be reached or does not serve the model asked for."""


class LaunchError(KilnError, RuntimeError):
    """A cluster or container that cannot take the job; the message says what to check."""


class SlurmError(LaunchError):
    pass


class RayError(LaunchError):
    pass
