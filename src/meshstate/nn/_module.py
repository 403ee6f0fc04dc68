"""`Module`: a container whose attributes hold states and submodules."""
from __future__ import annotations

from typing import Any, Iterator

from meshstate._state import State, _format_state
from meshstate.util.filter import to_predicate

__all__ = ['Module']

Path = tuple


def _children(obj: Any) -> Iterator[tuple[Any, Any]]:
  """The ``(path element, child)`` pairs below a module or a container, in definition order."""
  if isinstance(obj, Module):
    return iter(vars(obj).items())
  if isinstance(obj, dict):
    return iter(obj.items())
  if isinstance(obj, (list, tuple)):
    return enumerate(obj)
  return iter(())


def _is_node(obj: Any) -> bool:
  return isinstance(obj, (Module, dict, list, tuple))


def _walk(obj: Any, path: Path, seen: set[int]) -> Iterator[tuple[Path, State]]:
  """Every `State` below ``obj`` with the path that reaches it, each state and node once."""
  for key, child in _children(obj):
    child_path = path + (key,)
    if isinstance(child, State):
      if id(child) not in seen:
        seen.add(id(child))
        yield child_path, child
    elif _is_node(child) and id(child) not in seen:
      seen.add(id(child))
      yield from _walk(child, child_path, seen)


class Module:
  """Base class for models: states and submodules are plain attributes.

  States may also sit in lists, tuples and dicts held as attributes (nested to any depth). Their
  paths, e.g. ``('layers', 0, 'weight')``, are what `meshstate.util.filter` predicates such as
  `PathContains` see when a transform maps a module.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> class Affine(meshstate.nn.Module):
    ...   def __init__(self, n):
    ...     super().__init__()
    ...     self.weight = meshstate.ParamState(jnp.ones((n,)))
    ...   def __call__(self, x):
    ...     return self.weight.value * x
    >>> list(Affine(3).states())
    [('weight',)]
  """

  def __init__(self) -> None:
    pass

  def states(self, filter: Any = None) -> dict[Path, State]:  # noqa: A002 - public name
    """Map each path to its `State`, in attribute definition order.

    A state reachable along several paths is listed once, under the first one. ``filter`` is any
    selector `meshstate.util.filter.to_predicate` accepts (a filter, a `State` subclass, a path
    element name, ...), called as ``filter(path, state)``; ``None`` keeps every state.

    Args:
      filter: a selector choosing which states to list; None lists them all.

    Example:
      >>> import jax.numpy as jnp, meshstate
      >>> class Net(meshstate.nn.Module):
      ...   def __init__(self):
      ...     super().__init__()
      ...     self.w = meshstate.ParamState(jnp.ones(2))
      ...     self.h = meshstate.HiddenState(jnp.zeros(2))
      >>> list(Net().states(meshstate.ParamState))
      [('w',)]
    """
    found = dict(_walk(self, (), {id(self)}))
    if filter is None:
      return found
    predicate = to_predicate(filter)
    return {path: state for path, state in found.items() if predicate(path, state)}

  def state_paths(self) -> dict[State, Path]:
    """Map each `State` to the (first) path that reaches it: the reverse of `states()`."""
    return {state: path for path, state in _walk(self, (), {id(self)})}

  def __repr__(self) -> str:
    return _format_module(self, '', set())


def _format(obj: Any, indent: str, active: set[int]) -> str | None:
  """A nested, indented view of the states below ``obj``; None when there are none."""
  if isinstance(obj, State):
    return _format_state(obj, indent)
  if isinstance(obj, Module):
    return _format_module(obj, indent, active)
  if not isinstance(obj, (dict, list, tuple)) or id(obj) in active:
    return None
  active.add(id(obj))
  try:
    inner = indent + '  '
    lines = []
    for key, child in _children(obj):
      text = _format(child, inner, active)
      if text is not None:
        lines.append(f'{inner}{key!r}: {text}' if isinstance(obj, dict) else f'{inner}{text}')
  finally:
    active.discard(id(obj))
  if not lines:
    return None
  if isinstance(obj, dict):
    opening, closing = '{', '}'
  elif isinstance(obj, list):
    opening, closing = '[', ']'
  else:
    opening, closing = '(', ')'
    if len(lines) == 1 and len(obj) == 1:
      lines[0] += ','
  return opening + '\n' + ',\n'.join(lines) + '\n' + indent + closing


def _format_module(module: Module, indent: str, active: set[int]) -> str:
  name = type(module).__name__
  if id(module) in active:  # a module that (indirectly) holds itself
    return f'{name}(...)'
  active.add(id(module))
  try:
    inner = indent + '  '
    lines = []
    for key, child in vars(module).items():
      text = _format(child, inner, active)
      if text is not None:
        lines.append(f'{inner}{key}={text}')
  finally:
    active.discard(id(module))
  if not lines:
    return f'{name}()'
  return f'{name}(\n' + ',\n'.join(lines) + f'\n{indent})'


Module.__module__ = 'meshstate.nn'
