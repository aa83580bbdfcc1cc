"""Every error `lsd` reports to its user, in one place.

Each is raised with a message that names the bad value and what was expected; `lsd` prints
those in `USER_ERRORS` as one line (`lsd: error: ...`, exit 2). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad config value, key or file; the message names it and what is expected."""


class CheckpointError(ValueError):
    """A checkpoint or artifact that is missing, incomplete, or of another format or version."""


class ArtifactError(CheckpointError):
    """A `.lsdx` file that cannot be used: truncated, altered, another format or version, or a
    (batch, steps) variant it does not hold. The message names the file and what was expected."""


class ConversionError(CheckpointError):
    """A state dict that does not fit the model: the message names the key and the shapes."""


class FrameError(ValueError):
    """A frame of the wrong shape or dtype; the message names what it is and what was expected."""


class CodecUnavailableError(NotImplementedError):
    """A codec the config names that cannot be built here (e.g. it needs converted weights)."""


class PromptError(ValueError):
    """A prompt an encoder cannot embed; the message names it and what the encoder knows."""


class DataError(ConfigError):
    """Data that cannot make clips: an empty folder, a video shorter than a clip."""


class DataWarning(UserWarning):
    """A video file skipped because it cannot be read."""


class StreamInputError(ConfigError):
    """An input or output that cannot be opened, or a bad prompt schedule; names it."""


class VideoWriteError(OSError):
    """A video file that cannot be opened for writing; the message names the path."""


class WriteError(OSError):
    """A file the user keeps could not be written (a full disk, no permission); nothing was
    replaced (`lsd_jax.atomic`). The message names the path and the reason."""


USER_ERRORS = (ConfigError, CheckpointError, FrameError, PromptError, CodecUnavailableError,
               FileNotFoundError, VideoWriteError, WriteError)
