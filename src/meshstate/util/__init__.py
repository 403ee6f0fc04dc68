"""Utilities: `filter` holds the predicates that select states by type or path."""
from meshstate.util import filter  # noqa: A004 - public module name (brainstate.util.filter)

__all__ = ['filter']
