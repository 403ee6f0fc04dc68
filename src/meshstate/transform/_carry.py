"""The one state-carrying layer under the loop and autodiff transforms.

A transform asks `discover` which states its function reads and writes (one abstract trace),
then runs the function as a pure function of state values with `call`, inside the JAX primitive
it builds (`lax.scan`, `jax.grad`, ...), and finally hands the new values back with `write_back`.
Called inside another meshstate trace (a `pmap2` body, a meshstate `jit`, another loop), values
are read and written through the enclosing frames, so the outer transform records them; at top
level they go to the states' slots, and only once the whole transform has succeeded.

`Carried` is what loops and branches add on top: the written states' starting values, cast to
the type their body writes (a weakly typed Python scalar becomes the written dtype; inside
`shard_map`, a value becomes varying over the mesh axes its update varies over), and the check
that an update keeps the state's shape and dtype.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence, cast, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from meshstate._state import Frame, State, StateTraceError, _is_tracer, _local
from meshstate.transform._discover import vma_of

__all__ = ['Effects', 'Carried', 'nested', 'label', 'discover', 'call', 'read', 'write_back',
           'carry', 'holds_arrays']


def nested() -> bool:
  """Whether an outer meshstate trace is active on this thread."""
  return bool(_local.stack)


def label(state: State) -> str:
  """How errors name a state: its `name=` if given, else its type and shape."""
  name = getattr(state, '_name', None)
  if name:
    return f'{type(state).__name__} {name!r}'
  try:
    shapes = jax.tree.map(lambda x: str(jax.typeof(x)), state._value)
  except TypeError:
    shapes = type(state._value).__name__
  return f'{type(state).__name__} holding {shapes}'


def holds_arrays(value: Any) -> bool:
  """Whether every leaf is an array (not a Python scalar, string or other static value)."""
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves)


@dataclasses.dataclass(frozen=True)
class _Type:
  """How one array leaf is carried: shape, dtype, weak typing, mesh axes it varies over."""
  shape: tuple
  dtype: Any
  weak: bool = False
  vma: frozenset = frozenset()

  def __str__(self) -> str:
    return f'{self.dtype.name}{list(self.shape)}'


def _leaf_type(x: Any) -> _Type:
  aval = jax.typeof(x)
  return _Type(tuple(aval.shape), aval.dtype, bool(getattr(aval, 'weak_type', False)),
               vma_of(x))


def _types(value: Any) -> Any:
  """A pytree of `_Type`s for `value`, or None when it is not a JAX value (a string...)."""
  try:
    return jax.tree.map(_leaf_type, value)
  except TypeError:
    return None


@dataclasses.dataclass(frozen=True)
class Effects:
  """What one abstract trace of a function did to states, first touch first."""
  reads: tuple[State, ...]
  writes: tuple[State, ...]
  written: dict          # state -> `_Type` pytree of the value written (None: not JAX's)
  out: Any               # `jax.ShapeDtypeStruct`s of the function's output


def discover(fun: Callable, *args, preset: Mapping[State, Any] | None = None, **kwargs) -> Effects:
  """Trace `fun(*args, **kwargs)` abstractly and report the states it reads and writes.

  Arguments are closed over, so tracers of an enclosing trace keep their type (mesh axes they
  vary over included). `preset` shows those states with the given values. No state changes.
  """
  found = {}

  def probe():
    with Frame() as frame:
      for state, value in (preset or {}).items():
        frame.preset(state, value)
      out = fun(*args, **kwargs)
      found['effects'] = (tuple(frame.reads), tuple(frame.writes),
                          {s: _types(frame.values[s]) for s in frame.writes})
    return out

  out = jax.eval_shape(probe)
  return Effects(*found['effects'], out=out)


def read(states: Sequence[State]) -> list:
  """The states' values (through the enclosing frames when nested)."""
  return [s.value for s in states]


@overload
def call(fun: Callable, states: Sequence[State], values: Sequence[Any], *args: Any,
         outputs: None = None, where: str = 'transform',
         **kwargs: Any) -> tuple[Any, dict[State, Any]]: ...
@overload
def call(fun: Callable, states: Sequence[State], values: Sequence[Any], *args: Any,
         outputs: Sequence[State], where: str = 'transform',
         **kwargs: Any) -> tuple[Any, list[Any]]: ...
def call(fun: Callable, states: Sequence[State], values: Sequence[Any], *args: Any,
         outputs: Sequence[State] | None = None, where: str = 'transform',
         **kwargs: Any) -> tuple[Any, Any]:
  """Run `fun(*args, **kwargs)` with `states` showing `values`: `(out, new values)`.

  With `outputs`, the new values are those states' values at the end (a list); writing any
  other state is an error. Without, they are `{state: value}` of every state written.
  """
  with Frame() as frame:
    for state, value in zip(states, values):
      frame.preset(state, value)
    out = fun(*args, **kwargs)
    if outputs is None:
      return out, {s: frame.values[s] for s in frame.writes}
    allowed = set(outputs)
    stray = [s for s in frame.writes if s not in allowed]
    new = [frame.value_of(s) for s in outputs]
  if stray:
    raise RuntimeError(f'{where}: the function wrote {", ".join(map(label, stray))} on its second '
                       f'trace but not on its first; which states a function writes must not '
                       f'depend on values.')
  return out, new


def write_back(states: Sequence[State], values: Sequence[Any], where: str) -> None:
  """Give `states` their new values: through the enclosing frames, or (top level) the slots.

  At top level a traced value (the transform ran under a raw JAX transform) is refused before
  any state changes.
  """
  if nested():
    for state, value in zip(states, values):
      state.value = value
    return
  for state, value in zip(states, values):
    if _is_tracer(value):
      raise StateTraceError(
          f'{where} wrote {label(state)} with a traced value outside a meshstate transform (it '
          f'ran under a raw JAX transform such as jax.jit, jax.grad, jax.lax.scan or '
          f'jax.checkpoint). Use the meshstate equivalent around it: meshstate.transform.jit, '
          f'grad, for_loop/scan/while_loop, cond or checkpoint.')
  for state, value in zip(states, values):
    state._value = value


# -- carrying written states through loops and branches ------------------------------------------


def _merge(where: str, state: State, types: list) -> Any:
  """The one `_Type` pytree `state` is carried as, given the types it must take; else an error."""
  if any(t is None for t in types):
    raise TypeError(f'{where}: {label(state)} is written with a value that is not a JAX array; '
                    f'only array-valued states can be carried through {where}.')
  trees = [jax.tree.structure(t) for t in types]
  for tree in trees[1:]:
    if tree != trees[0]:
      raise ValueError(f'{where}: {label(state)} changes its structure ({trees[0]} vs {tree}); '
                       f'a state carried through {where} must keep it.')
  return jax.tree.map(lambda *leaves: _merge_leaf(where, state, leaves), *types)


def _merge_leaf(where: str, state: State, leaves: Sequence[_Type]) -> _Type:
  shapes = {t.shape for t in leaves}
  strong = {t.dtype for t in leaves if not t.weak}
  if len(shapes) > 1 or len(strong) > 1:
    seen = ' vs '.join(dict.fromkeys(map(str, leaves)))
    raise ValueError(f'{where}: {label(state)} changes shape or dtype ({seen}); a state carried '
                     f'through {where} must keep its shape and dtype.')
  # Weakly typed values (Python scalars) take the type of the strong ones, else promote.
  dtype = strong.pop() if strong else functools.reduce(jnp.promote_types,
                                                       (t.dtype for t in leaves))
  return _Type(leaves[0].shape, dtype, False, frozenset().union(*(t.vma for t in leaves)))


def _fit(value: Any, target: _Type) -> Any:
  """`value` cast to the carried dtype and made varying over the carried mesh axes."""
  aval = jax.typeof(value)
  if aval.dtype != target.dtype or getattr(aval, 'weak_type', False):
    value = lax.convert_element_type(value, target.dtype)
  missing = tuple(sorted(target.vma - vma_of(value), key=str))
  if missing:
    value = lax.pcast(value, missing, to='varying')
  return value


def _fit_tree(value: Any, types: Any) -> Any:
  leaves, tree = jax.tree.flatten(value)
  return tree.unflatten(list(map(_fit, leaves, tree.flatten_up_to(types))))


@dataclasses.dataclass
class Carried:
  """States written by a loop body or by branches, their starting values and carried types."""
  states: list
  values: list
  types: list   # per state, a pytree of `_Type`

  def fit(self, values: Sequence[Any]) -> list:
    """New values (a body's or a branch's) cast to the carried types."""
    return list(map(_fit_tree, values, self.types))


def carry(where: str, trace: Callable[[dict], list[Effects]], loop: bool) -> Carried:
  """The states that `trace(preset)`'s traces write, with starting values fitted to them.

  `trace` re-runs discovery with the written states preset to the given values; it is called
  again while fitting widens the mesh axes a starting value varies over (inside `shard_map`,
  an update can vary over more axes once its inputs do). In a loop (`loop=True`) every update
  must keep the state's type; among branches, only a state some branch leaves alone must.
  """
  effects = trace({})
  states = list(dict.fromkeys(s for e in effects for s in e.writes))
  values = read(states)
  for state, value in zip(states, values):
    if _types(value) is None:
      raise TypeError(f'{where}: {label(state)} holds a {type(value).__name__}, which cannot be '
                      f'carried through {where}; store an array in it.')
  types = None
  for _ in range(8):
    new_types = []
    for state, value in zip(states, values):
      seen = [e.written[state] for e in effects if state in e.written]
      if loop or len(seen) < len(effects):
        seen.insert(0, _types(value))
      new_types.append(_merge(where, state, seen))
    if new_types == types:
      break
    types = new_types
    values = list(map(_fit_tree, values, types))
    if not any(t.vma for t in jax.tree.leaves(types)):
      break   # nothing varies over mesh axes: one discovery is enough
    effects = trace(dict(zip(states, values)))
  return Carried(states, values, cast(list, types))
