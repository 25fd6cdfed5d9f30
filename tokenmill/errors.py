"""Typed errors raised at tokenmill's boundaries. Each message names the bad value and what would be right."""


class TokenmillError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class ModelLoadError(TokenmillError):
    """A model file or folder cannot be read (missing, truncated, not the expected format)."""


class UnsupportedError(TokenmillError):
    """The model uses an architecture, tensor type or feature tokenmill does not support."""


class InvalidRequestError(TokenmillError, ValueError):
    """A generation request or parameter is out of range (empty prompt, negative max tokens, ...)."""


class GenerationError(TokenmillError):
    """A generation that started could not go on (its sampling constraints ran out of tokens, a step failed)."""
