"""Inspection of how states are laid out on a mesh."""
