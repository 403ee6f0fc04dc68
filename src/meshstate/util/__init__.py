"""Utilities: `filter` holds the predicates that select states by type or path."""
from meshstate.util import filter

__all__ = ['filter']
