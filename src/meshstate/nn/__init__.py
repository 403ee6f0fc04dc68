"""Model containers: `Module` holds states and submodules as attributes."""
from meshstate.nn._module import Module

__all__ = ['Module']
