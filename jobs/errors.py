"""User-facing errors of the job layer (clear messages, no traceback unless --debug)."""
from __future__ import annotations

from models.interface import ModelError


class XS2TError(Exception):
    """Base of errors shown to the user as one clear message."""


class SpecError(XS2TError):
    """An invalid job file: the message names the field and the reason."""


class CorpusError(XS2TError):
    """A corpus problem: the message names the file, the segment and the reason."""


class RunError(XS2TError):
    """A run-directory problem (lock held, missing plan, ...)."""


USER_ERRORS = (XS2TError, ModelError, FileNotFoundError)
