"""Exceptions a user can act on.

Every message names the file (or directory) and the problem in one line; the CLI prints
``wsi-dala: error: <message>`` and exits non-zero.
"""

from __future__ import annotations


class WsiDalaError(Exception):
    """Base class of errors that are the input's fault, not a bug."""


class SlideOpenError(WsiDalaError):
    """The file is missing, is not a slide, or is damaged."""


class SlideReadError(WsiDalaError):
    """A region of an otherwise readable slide could not be decoded."""


class ResolutionError(WsiDalaError):
    """The slide's µm/px is unknown, or the target resolution cannot be served."""


class OutputError(WsiDalaError):
    """The output location cannot be written or holds something we must not overwrite."""


class ConfigError(WsiDalaError):
    """A configuration file or option is invalid."""


class CheckpointError(WsiDalaError):
    """A model checkpoint is missing, unsafe or inconsistent."""


class QualityError(WsiDalaError):
    """The slide has nothing a classifier can be trusted on: no tissue, or tissue all out of focus."""


class EngineError(WsiDalaError):
    """An inference engine is not installed, cannot run the asked precision, or cannot take the model."""


class EngineExportError(EngineError):
    """A model could not be exported or quantised for an engine: the pipeline falls back to torch."""


class EngineFileError(EngineError):
    """An engine could not load a model file from the cache (cut short, corrupted): it is rebuilt."""
