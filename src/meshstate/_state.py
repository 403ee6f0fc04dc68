"""`State` objects and the trace stack that records which states a function touches."""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import get_opaque_trace_state

from meshstate._compat import at_trace, current_trace, tracer_kind

__all__ = ['State', 'ParamState', 'ShortTermState', 'LongTermState', 'HiddenState',
           'StateTraceError', 'is_static_value', 'traced_write_error', 'in_frame_trace']

_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, float, complex)


def is_static_value(value: Any) -> bool:
  """Whether a state's value is static to transforms: a Python value (bool, int, str, ...).

  Such a value is not traced: the function sees it as is, may branch on it, and the program
  is rebuilt when it changes.
  """
  leaves = jax.tree.leaves(value)
  return not leaves or any(isinstance(x, bool) or not isinstance(x, _ARRAY_LIKE) for x in leaves)


class StateTraceError(RuntimeError):
  """A traced value tried to escape into a `State` outside meshstate's transforms."""


_DEFAULT_ADVICE = ('jax.jit, jax.grad, jax.vmap, jax.lax.scan or jax.checkpoint',
                   'meshstate.transform.jit, grad, vmap2, for_loop/scan/while_loop, cond or '
                   'checkpoint')
_ADVICE = {   # by the kind of tracer the value is: which transform put it there
    'BatchTracer': ('jax.vmap', 'meshstate.transform.vmap2'),
    'JVPTracer': ('jax.grad or jax.jvp', 'meshstate.transform.grad (or value_and_grad, '
                  'jacrev, jacfwd)'),
    'LinearizeTracer': ('jax.grad or jax.linearize', 'meshstate.transform.grad (or '
                        'value_and_grad, vjp)'),
    'DynamicJaxprTracer': ('jax.jit, jax.lax.scan/while_loop/cond or jax.checkpoint',
                           'meshstate.transform.jit, for_loop/scan/while_loop, cond/switch or '
                           'checkpoint'),
}


def traced_write_error(what: str, value: Any) -> StateTraceError:
  """The error for `what` (a write of `value` into states) under a raw JAX transform."""
  tracers = [x for x in jax.tree.leaves(value) if isinstance(x, jax.core.Tracer)]  # pyright: ignore[reportAttributeAccessIssue]
  raw, ours = _ADVICE.get(tracer_kind(tracers[0]) if tracers else '', _DEFAULT_ADVICE)
  return StateTraceError(f'{what} under a raw JAX transform ({raw}), so a State would be left '
                         f'holding a tracer. Use the meshstate equivalent instead: {ours}.')


class _Local(threading.local):
  def __init__(self):
    self.stack: list[Frame] = []


_local = _Local()
# Frames open in all threads together: while it is 0, no thread traces, and a call can skip
# the (slower) thread-local look-up of its own stack.
frames_open = [0]
_frames_lock = threading.Lock()


def frames() -> list['Frame']:
  """The active trace frames of this thread, innermost last."""
  return _local.stack


def _on_mesh(mesh: Any):
  """Context: `mesh` as the abstract mesh, where it has axes and is not the current one."""
  if not mesh.axis_names or mesh == jax.sharding.get_abstract_mesh():
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


class Frame:
  """Records, in first-touch order, the states read and written while a function is traced.

  A frame never changes a `State`'s shared slot. What the body sees of a state while it is
  traced (its *view*: a per-lane placeholder, an input tracer, a value it wrote) lives in the
  frame, which belongs to the tracing thread, so no tracer is ever visible to another thread.
  On its first read of a state a frame may replace the value by a view
  (`view(state, value) -> value`). Reads go through the enclosing frame first, so nested
  transforms see (and record) what their parent sees.
  """

  def __init__(self, view: Callable[['State', Any], Any] | None = None):
    self.view = view
    self.values: dict[State, Any] = {}   # what this frame shows of each state it touched
    self.reads: dict[State, None] = {}
    self.static_reads: dict[State, Any] = {}   # states read holding Python values, and those
    self.writes: dict[State, None] = {}
    self.touched: dict[State, None] = {}  # reads and writes, first touch first
    self.created: set[int] = set()
    self.parent: Frame | None = None
    self.trace: Any = None   # the JAX trace the frame was entered in (opaque)
    self.level: Any = None   # the same trace, to bind views to
    self.mesh: Any = None    # the abstract mesh it was entered under, to type views by

  def __enter__(self) -> 'Frame':
    self.trace = get_opaque_trace_state()
    self.level = current_trace()
    self.mesh = jax.sharding.get_abstract_mesh()
    stack = _local.stack
    self.parent = stack[-1] if stack else None
    with _frames_lock:
      frames_open[0] += 1
    stack.append(self)
    return self

  def __exit__(self, *exc) -> None:
    stack = _local.stack
    assert stack and stack[-1] is self, 'meshstate trace frames exited out of order'
    stack.pop()
    with _frames_lock:
      frames_open[0] -= 1

  def value_of(self, state: 'State') -> Any:
    """What the body sees of `state` now (recording nothing)."""
    if state in self.values:
      return self.values[state]
    return self.parent.value_of(state) if self.parent is not None else state._value

  def preset(self, state: 'State', value: Any) -> None:
    """Show `value` to the body as `state`'s value, recorded as a read."""
    self.reads[state] = None
    self.touched[state] = None
    self.values[state] = value

  def read(self, state: 'State') -> Any:
    if state in self.values:
      return self.values[state]
    if id(state) in self.created:
      return state._value
    base = self.parent.read(state) if self.parent is not None else state._value
    self.touched[state] = None
    if is_static_value(base):
      self.static_reads[state] = base
    else:
      self.reads[state] = None
      if self.view is not None:
        # Made at the frame's own trace level, even when first read inside a scan, cond or
        # jax.jit body (which then closes over it): the read stays in the frame's own jaxpr,
        # under the frame's own mesh (not that of a shard_map body nested in it).
        with at_trace(self.level), _on_mesh(self.mesh):
          base = self.view(state, base)
    self.values[state] = base
    return base

  def write(self, state: 'State', value: Any) -> None:
    if id(state) in self.created:   # made while tracing: no other thread has it yet
      state._value = value
      return
    self.writes[state] = None
    self.touched[state] = None
    self.values[state] = value


def in_frame_trace() -> bool:
  """Whether JAX is tracing at the level the innermost frame was entered (no raw transform
  between them), so values written now may be carried out by that frame's transform."""
  stack = _local.stack
  return not stack or stack[-1].trace == get_opaque_trace_state()


def _is_tracer(value: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value))  # pyright: ignore[reportAttributeAccessIssue]


class State:
  """A mutable container for a JAX value that meshstate's transforms carry in and out.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.ones(3))
    >>> w.value = w.value * 2
    >>> w.value.tolist()
    [2.0, 2.0, 2.0]
  """

  __slots__ = ('_value', '_name', '__weakref__')

  def __init__(self, value: Any, name: str | None = None):
    """Hold `value`.

    Args:
      value: the initial value: a `jax.Array` or a pytree of arrays (it may be replaced later
        by one of another shape or dtype), or a Python value (a bool, an int, a string), which
        every transform treats as static.
      name: a name for error messages and `describe` tables.
    """
    self._value = value
    self._name = name
    stack = _local.stack
    if stack:
      stack[-1].created.add(id(self))

  @property
  def value(self) -> Any:
    stack = _local.stack
    if stack:
      return stack[-1].read(self)
    return self._value

  @value.setter
  def value(self, value: Any) -> None:
    if isinstance(value, State):
      raise TypeError(f'Cannot store a State inside {type(self).__name__}.value; '
                      f'assign its .value instead.')
    stack = _local.stack
    if stack:
      stack[-1].write(self, value)
      return
    if _is_tracer(value):
      raise traced_write_error(f'A traced value was written into {type(self).__name__}', value)
    self._value = value

  @property
  def sharding(self):
    """The `jax.sharding.Sharding` of the value, or None when it is not a `jax.Array`."""
    value = self._value
    return value.sharding if isinstance(value, jax.Array) else None

  @property
  def spec(self):
    """The `PartitionSpec` of a `NamedSharding` value, else None."""
    return getattr(self.sharding, 'spec', None)

  def __repr__(self) -> str:
    return _format_state(self, indent='')


def _abstract(value: Any) -> Any:
  try:
    return jax.tree.map(jax.typeof, value)
  except TypeError:
    return value


def _format_state(state: State, indent: str) -> str:
  inner = indent + '  '
  return f'{type(state).__name__}(\n{inner}value={_abstract(state._value)!r}\n{indent})'


class ParamState(State):
  """A trainable parameter."""
  __slots__ = ()


class ShortTermState(State):
  """A variable that lives for one step (activations, per-step buffers)."""
  __slots__ = ()


class LongTermState(State):
  """A variable that persists across steps but is not trained (running statistics)."""
  __slots__ = ()


class HiddenState(State):
  """A dynamical variable carried through time (membrane potentials, RNN hidden states)."""
  __slots__ = ()


for _cls in (State, ParamState, ShortTermState, LongTermState, HiddenState, StateTraceError):
  _cls.__module__ = 'meshstate'
