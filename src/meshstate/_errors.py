"""Errors that meshstate raises on purpose, and where its warnings point."""
import os
import sys

import jax

__all__ = ['BatchAxisError', 'user_stacklevel']


class BatchAxisError(ValueError):
  """A state written with per-lane values has no declared out axis (policy ``'raise'``)."""


BatchAxisError.__module__ = 'meshstate'


def user_stacklevel() -> int:
  """The `warnings` stacklevel of the first frame outside meshstate and JAX: the user's call."""
  import meshstate
  skip = (os.path.dirname(meshstate.__file__), os.path.dirname(jax.__file__))
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_code.co_filename.startswith(skip):
    frame, level = frame.f_back, level + 1
  return level
