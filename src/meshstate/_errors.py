"""Errors that meshstate raises on purpose."""

__all__ = ['BatchAxisError']


class BatchAxisError(ValueError):
  """A state written with per-lane values has no declared out axis (policy ``'raise'``)."""


BatchAxisError.__module__ = 'meshstate'
