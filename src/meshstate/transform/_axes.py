"""Axis bookkeeping: `in_axes`/`out_axes`/state axes → one axis per leaf, mapped sizes, specs."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Sequence, cast, overload

import jax
from jax.sharding import PartitionSpec as P

from meshstate.util.filter import to_predicate

__all__ = ['entry_axes', 'spec_entries', 'normalize_state_axes', 'leaf_axes', 'check_axis',
           'mapped_size', 'spec_at', 'split_static', 'normalize_argnums']

# `None` is an empty pytree; while broadcasting an axes prefix it must stay a leaf.
_UNMAPPED = type('Unmapped', (), {'__repr__': lambda self: 'None'})()


def normalize_state_axes(axes: Any, argname: str) -> dict[int, Callable]:
  """`{axis: selector}` or a bare selector (meaning `{0: selector}`) → `{axis: predicate}`."""
  if axes is None:
    return {}
  if not isinstance(axes, dict):
    axes = {0: axes}
  out = {}
  for axis, selector in axes.items():
    if not isinstance(axis, int) or isinstance(axis, bool):
      raise TypeError(f'{argname} keys must be integer axes, got {axis!r}.')
    out[axis] = to_predicate(selector)
  return out


def arg_name(path) -> str:
  """How messages name an argument leaf, from its path in `(args, kwargs)`: `args[1]['w']`."""
  kind, *rest = path
  key = jax.tree_util.keystr(tuple(rest))
  return f'args{key}' if kind.idx == 0 else f'kwargs{key}'


@overload
def check_axis(axis: int, ndim: int, what: str, shape: tuple, extra: int = 0) -> int: ...
@overload
def check_axis(axis: None, ndim: int, what: str, shape: tuple, extra: int = 0) -> None: ...
def check_axis(axis: int | None, ndim: int, what: str, shape: tuple, extra: int = 0) -> int | None:
  """Normalise a possibly negative `axis` for an array of `ndim` (+`extra`) dimensions."""
  if axis is None:
    return None
  if not isinstance(axis, int) or isinstance(axis, bool):
    raise TypeError(f'{what}: axis must be an int or None, got {axis!r}.')
  n = ndim + extra
  if not -n <= axis < n:
    inserted = ' once the mapped axis is inserted' if extra else ''
    raise ValueError(f'{what}: axis {axis} is out of range for a value of shape {tuple(shape)}'
                     f'{inserted} (valid axes are {-n}..{n - 1}).')
  return axis % n if n else axis


def leaf_axes(axes: Any, tree: Any, argname: str, what: str, extra: int = 0) -> list[int | None]:
  """Broadcast the prefix `axes` over `tree`; one normalised axis per leaf of `tree`."""
  prefix = jax.tree.map(lambda a: _UNMAPPED if a is None else a, axes,
                        is_leaf=lambda a: a is None)
  try:
    full = jax.tree.broadcast(prefix, tree)
  except ValueError as err:
    raise ValueError(f'{argname}={axes!r} is not a prefix of the {what} structure '
                     f'{jax.tree.structure(tree)}: {err}') from None
  paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = jax.tree.leaves(full)
  out = []
  for (path, leaf), axis in zip(paths_leaves, flat):
    axis = None if axis is _UNMAPPED else axis
    shape = _shape(leaf)
    name = arg_name(path) if what == 'argument' else f'{what}{jax.tree_util.keystr(path)}'
    out.append(check_axis(axis, len(shape), f'{argname} for {name}', shape, extra))
  return out


def _shape(x: Any) -> tuple:
  return tuple(getattr(x, 'shape', ()))


def mapped_size(sources: Iterable[tuple[str, int]], axis_size: int | None) -> int:
  """The one mapped size implied by `(source, size)` pairs and `axis_size`, else ValueError."""
  sizes: dict[int, list[str]] = {}
  for where, size in sources:
    sizes.setdefault(size, []).append(where)
  others = {s: w for s, w in sizes.items() if s != axis_size}
  if axis_size is not None and len(others) == 1:
    (size, where), = others.items()
    raise ValueError(f'axis_size={axis_size} conflicts with the mapped size {size} of '
                     f'{", ".join(where)}; drop axis_size= or pass arguments of size {axis_size}.')
  if axis_size is not None:
    sizes.setdefault(axis_size, []).append('axis_size')
  if len(sizes) > 1:
    lines = '\n'.join(f'  size {s}: {", ".join(w)}' for s, w in sizes.items())
    raise ValueError(f'Mapped axes must all have the same size, but got:\n{lines}')
  if not sizes:
    raise ValueError('Cannot infer the mapped size: no argument or state is mapped; '
                     'pass axis_size=.')
  return next(iter(sizes))


def entry_axes(entry: Any) -> tuple:
  """The mesh axes one `PartitionSpec` entry names (None, a name, or a tuple of names)."""
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def spec_entries(spec: Any, ndim: int) -> list:
  """One entry of `spec` per dimension of a rank-`ndim` value (None past the spec's end)."""
  return [*spec, *[None] * (ndim - len(spec))]


@functools.lru_cache(maxsize=None)
def spec_at(axis: int | None, name: Any) -> P:
  """`PartitionSpec` that puts mesh axis `name` at dimension `axis` (replicated for None)."""
  if axis is None:
    return P()
  return P(*([None] * axis), name)


def normalize_argnums(argnums: int | Sequence[int], argname: str) -> tuple[int, ...]:
  if isinstance(argnums, int):
    argnums = (argnums,)
  out = tuple(argnums)
  if not all(isinstance(i, int) for i in out):
    raise TypeError(f'{argname} must be an int or a sequence of ints, got {argnums!r}.')
  return out


def positional_names(fun: Callable) -> list[str | None]:
  """Per positional parameter of `fun`, its name when it may also be passed by keyword."""
  try:
    params = list(inspect.signature(fun).parameters.values())
  except (TypeError, ValueError):
    return []
  kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
  return [p.name if p.kind in kinds else None for p in params
          if p.kind in (*kinds, inspect.Parameter.POSITIONAL_ONLY)]


def link_static(fun: Callable, argnums: tuple[int, ...],
                argnames: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[str, ...]]:
  """Static positions and names that also cover the other spelling, as `jax.jit` does."""
  both = positional_names(fun)
  names = argnames + tuple(cast(str, both[i]) for i in argnums
                           if -len(both) <= i < len(both) and both[i] is not None
                           and both[i] not in argnames)
  nums = argnums + tuple(i for i, n in enumerate(both) if n in argnames and i not in argnums)
  return nums, names


def split_static(args: tuple, static: tuple[int, ...]) -> tuple[tuple, tuple]:
  """Replace static positional arguments by None (an empty pytree); return them separately."""
  if not static:
    return args, ()
  n = len(args)
  idx = [i % n for i in static if -n <= i < n]
  values = tuple((i, args[i]) for i in sorted(idx))
  for i, v in values:
    try:
      hash(v)
    except TypeError:
      raise ValueError(f'Static argument at position {i} must be hashable, got {type(v).__name__}: '
                       f'{v!r}.') from None
  dyn = tuple(None if i in idx else a for i, a in enumerate(args))
  return dyn, values
