"""griffe extension for the docs site: read `Example:` sections as examples.

meshstate's docstrings use Google style's `Example:` heading (as napoleon reads it); griffe
knows only `Examples:`, and would render the doctest lines as quoted text. This renames the
heading in the docstrings it loads, so each example is shown as a Python console block.
"""
from __future__ import annotations

import re
from typing import Any

import griffe

HEADING = re.compile(r'^(\s*)Example:[ \t]*$', re.M)


def _walk(obj: Any, seen: set[int]) -> None:
  if id(obj) in seen or obj.is_alias:
    return
  seen.add(id(obj))
  if obj.docstring is not None:
    obj.docstring.value = HEADING.sub(r'\1Examples:', obj.docstring.value)
  for member in obj.members.values():
    _walk(member, seen)


class ExampleSections(griffe.Extension):
  """Rename `Example:` headings to `Examples:` in every loaded docstring."""

  def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
    _walk(pkg, set())
