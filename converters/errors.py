"""Errors raised while locating, reading or converting model weights."""
from __future__ import annotations


class WeightLoadError(ValueError):
    """A model source could not be loaded: the message names the file and, where there is one, the tensor.

    A `ValueError` subclass, so callers that validate user input with `except ValueError` catch it too.
    """
