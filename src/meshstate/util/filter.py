"""Predicates over ``(path, state)`` pairs that select states.

A *path* is the tuple of attribute names, list indices and dict keys that leads from a
`meshstate.nn.Module` to a state, e.g. ``('layers', 0, 'weight')``. When a state is not reached
through a module (a closed-over state, the global random state) its path is ``()``.

Example:
  >>> import meshstate
  >>> from meshstate.util.filter import All, Not, OfType, PathContains
  >>> f = All(OfType(meshstate.ParamState), Not(PathContains('bias')))
  >>> f(('fc', 'weight'), meshstate.ParamState(0.0))
  True
  >>> f(('fc', 'bias'), meshstate.ParamState(0.0))
  False
"""
from __future__ import annotations

from typing import Any as _AnyType, Callable, Hashable, cast

from meshstate._state import State

_builtin_type = type  # `type` is shadowed by OfType's argument name

__all__ = ['Filter', 'OfType', 'Any', 'All', 'Not', 'Everything', 'Nothing', 'PathContains',
           'to_predicate']

Path = tuple
Predicate = Callable[[Path, State], bool]


class Filter:
  """Base class of the filter combinators: callable as ``f(path, state) -> bool``.

  Filters compare equal (and hash alike) when they are of the same class with equal arguments,
  so they can serve as dict keys, e.g. in ``state_in_axes={0: OfType(ParamState)}``. They compose
  with ``&`` (`All`), ``|`` (`Any`) and ``~`` (`Not`).
  """

  __slots__ = ()

  def __call__(self, path: Path, state: State) -> bool:
    raise NotImplementedError

  def _key(self) -> tuple:
    return ()

  def __eq__(self, other: object) -> bool:
    if type(self) is not type(other) or not isinstance(other, Filter):
      return NotImplemented
    return self._key() == other._key()

  def __ne__(self, other: object) -> bool:
    eq = self.__eq__(other)
    return eq if eq is NotImplemented else not eq

  def __hash__(self) -> int:
    return hash((type(self), self._key()))

  def __and__(self, other: _AnyType) -> 'All':
    return All(self, other)

  def __rand__(self, other: _AnyType) -> 'All':
    return All(other, self)

  def __or__(self, other: _AnyType) -> 'Any':
    return Any(self, other)

  def __ror__(self, other: _AnyType) -> 'Any':
    return Any(other, self)

  def __invert__(self) -> 'Not':
    return Not(self)


class OfType(Filter):
  """True for states that are instances of ``type`` (a class or a tuple of classes).

  Args:
    type: a class, or a tuple of classes (any of them matches).

  Example:
    >>> from meshstate import ParamState, State
    >>> OfType(ParamState)((), ParamState(0.0)), OfType(ParamState)((), State(0.0))
    (True, False)
  """

  __slots__ = ('type',)

  def __init__(self, type: type | tuple[type, ...]):  # noqa: A002 - mirrors the public name
    classes = type if isinstance(type, tuple) else (type,)
    if not classes or not all(isinstance(c, _builtin_type) for c in classes):
      raise TypeError(f'OfType expects a class or a tuple of classes, got {type!r}')
    self.type = type

  def __call__(self, path: Path, state: State) -> bool:
    return isinstance(state, self.type)

  def _key(self) -> tuple:
    return (self.type,)

  def __repr__(self) -> str:
    return f'OfType({self.type!r})'



class PathContains(Filter):
  """True when ``name`` is one of the path's elements (an exact match, not a substring).

  Args:
    name: the path element to look for: an attribute name, a dict key or a list index.

  Example:
    >>> from meshstate import State
    >>> PathContains('bias')(('layers', 0, 'bias'), State(0.0))
    True
  """

  __slots__ = ('name',)

  def __init__(self, name: Hashable):
    self.name = name

  def __call__(self, path: Path, state: State) -> bool:
    name = self.name
    # `type(...) is` keeps `PathContains(1)` from matching `True` and `PathContains(0)` `0.0`.
    return any(element == name and type(element) is type(name) for element in path)

  def _key(self) -> tuple:
    return (type(self.name), self.name)

  def __repr__(self) -> str:
    return f'PathContains({self.name!r})'


class _Combination(Filter):
  """Combines several selectors (any that `to_predicate` accepts) with `_reduce`."""

  __slots__ = ('filters',)
  _reduce = staticmethod(any)

  def __init__(self, *filters: _AnyType):
    self.filters = tuple(to_predicate(f) for f in filters)

  def __call__(self, path: Path, state: State) -> bool:
    return self._reduce(f(path, state) for f in self.filters)

  def _key(self) -> tuple:
    return self.filters

  def __repr__(self) -> str:
    return f'{type(self).__name__}({", ".join(map(repr, self.filters))})'


class Any(_Combination):
  """True when at least one of ``filters`` is true (``Any()`` is never true).

  Args:
    *filters: the selectors to combine, each one that `to_predicate` accepts (a filter, a
      `State` subclass, a `State`, an iterable of `State`s, a path element name, a callable
      `(path, state) -> bool`).

  Example:
    >>> from meshstate import ParamState
    >>> Any(ParamState, 'bias')(('bias',), ParamState(0.0))
    True
  """
  __slots__ = ()
  _reduce = staticmethod(any)


class All(_Combination):
  """True when every one of ``filters`` is true (``All()`` is always true).

  Args:
    *filters: the selectors to combine, each one that `to_predicate` accepts (a filter, a
      `State` subclass, a `State`, an iterable of `State`s, a path element name, a callable
      `(path, state) -> bool`).

  Example:
    >>> from meshstate import ParamState
    >>> All(ParamState, 'bias')(('weight',), ParamState(0.0))
    False
  """
  __slots__ = ()
  _reduce = staticmethod(all)


class Not(Filter):
  """True when ``filter`` is false.

  Args:
    filter: the selector to negate, one that `to_predicate` accepts (a filter, a `State`
      subclass, a `State`, an iterable of `State`s, a path element name, a callable
      `(path, state) -> bool`).

  Example:
    >>> from meshstate import ParamState, State
    >>> Not(ParamState)((), State(0.0))
    True
  """

  __slots__ = ('filter',)

  def __init__(self, filter: _AnyType):  # noqa: A002 - mirrors the public name
    self.filter = to_predicate(filter)

  def __call__(self, path: Path, state: State) -> bool:
    return not self.filter(path, state)

  def _key(self) -> tuple:
    return (self.filter,)

  def __repr__(self) -> str:
    return f'Not({self.filter!r})'


class Everything(Filter):
  """True for every state."""

  __slots__ = ()

  def __call__(self, path: Path, state: State) -> bool:
    return True

  def __repr__(self) -> str:
    return 'Everything()'


class Nothing(Filter):
  """False for every state."""

  __slots__ = ()

  def __call__(self, path: Path, state: State) -> bool:
    return False

  def __repr__(self) -> str:
    return 'Nothing()'


class _SameStates(Filter):
  """True for the given `State` objects themselves (compared by identity, not by value)."""

  __slots__ = ('states', '_ids')

  def __init__(self, states: tuple[State, ...]):
    unique: dict[int, State] = {}
    for s in states:
      unique.setdefault(id(s), s)
    self.states = tuple(unique.values())
    self._ids = frozenset(unique)

  def __call__(self, path: Path, state: State) -> bool:
    return id(state) in self._ids

  def _key(self) -> tuple:
    return (self._ids,)

  def __repr__(self) -> str:
    inner = ', '.join(f'<{type(s).__name__} at {id(s):#x}>' for s in self.states)
    return f'SameStates({inner})'


def to_predicate(selector: _AnyType) -> Predicate:
  """Turn a *selector* into a predicate ``f(path, state) -> bool``.

  * a `Filter`, or any other callable taking ``(path, state)``: returned as is;
  * a `State` instance: matches exactly that state (by identity);
  * a list, tuple, set or frozenset of `State`s: matches any of them (by identity); a collection
    of other selectors becomes their `Any`;
  * a `State` subclass: `OfType` of it;
  * a string: `PathContains` of it.

  Anything else (``None``, ``True``, numbers, non-State classes, ...) raises a `TypeError`.

  Args:
    selector: the selector to turn into a predicate.

  Example:
    >>> from meshstate import ParamState
    >>> to_predicate('weight')(('weight',), ParamState(0.0))
    True
  """
  if isinstance(selector, Filter):
    return selector
  if isinstance(selector, State):
    return _SameStates((selector,))
  if isinstance(selector, _builtin_type):
    if issubclass(selector, State):
      return OfType(selector)
    if issubclass(selector, Filter):
      raise TypeError(f'Cannot use the filter class {selector.__name__} as a state selector; '
                      f'instantiate it, e.g. {selector.__name__}(...).')
    raise TypeError(f'Cannot use the class {selector!r} as a state selector: only subclasses of '
                    f'meshstate.State select states by type (use OfType for other classes).')
  if isinstance(selector, str):
    return PathContains(selector)
  if isinstance(selector, (list, tuple, set, frozenset)):
    items = list(selector)
    if all(isinstance(item, State) for item in items):
      return _SameStates(tuple(items))
    try:
      return Any(*items)
    except TypeError as e:
      raise TypeError(f'Cannot use {selector!r} as a state selector: {e}') from None
  if isinstance(selector, bool) or selector is None:
    raise TypeError(f'Cannot use {selector!r} as a state selector; use '
                    f'meshstate.util.filter.Everything() or Nothing() instead.')
  if callable(selector):
    return cast(Predicate, selector)
  raise TypeError(f'Cannot use {selector!r} (of type {type(selector).__name__}) as a state '
                  f'selector: expected a filter, a callable (path, state) -> bool, a State, an '
                  f'iterable of States, a State subclass or a path element name (str).')


for _cls in (Filter, OfType, Any, All, Not, Everything, Nothing, PathContains, _SameStates):
  _cls.__module__ = 'meshstate.util.filter'
del _cls
