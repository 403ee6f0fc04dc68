"""The engine shared by `pmap2`, `vmap2`, `shard_map` and `jit`: `StatefulMapping`.

One call is one pipeline: signature → cache lookup → (on a miss) discovery and program → run
→ write-back. A cache entry holds the states the function reads and writes, how each is laid
out, and one compiled callable; an identical repeat call runs no Python body and builds nothing.
Subclasses (the state-aware `shard_map`) change only how slots are laid out: the `_layout_*`
hooks below.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import operator
import re
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from meshstate._compat import ArrayImpl as _ArrayImpl
from meshstate._compat import api_boundary, array_sharding, drop_own_frame, filter_traceback
from meshstate._errors import BatchAxisError, user_stacklevel
from meshstate._state import Frame, State, _local, frames_open, in_frame_trace, traced_write_error
from meshstate.nn import Module
from meshstate.random import RandomState
from meshstate.transform import _axes
from meshstate.transform._discover import discover, lane_key, lane_slice, placeholder, vary
from meshstate.transform._lift import Reader, never_blocks
from meshstate.transform._mappers import CustomMapper, Mapper, NeedMesh, VmapMapper
from meshstate.transform._mesh import NeedAxis, context_key, typed_elsewhere
from meshstate.transform._multihost import (assert_same_across_processes, is_global, to_global,
                                            to_local)
from meshstate.transform._plan import Plan
from meshstate.transform._transfer import put
from meshstate.util.filter import _SameStates

if TYPE_CHECKING:   # imported when called (sharding.py reads plans; it never imports the engine)
  from meshstate.sharding import Explanation
  from meshstate.transform._aot import Lowered

__all__ = ['StatefulMapping', 'Layout']

_POLICIES = ('auto', 'warn', 'ignore', 'raise')
_names = itertools.count()


@dataclasses.dataclass
class Layout:
  """How one entry's program slots relate to the user's arguments, outputs and states.

  `slot_axes` / `out_slot_axes` hold one layout per slot: a mapped axis (int or None) for
  `pmap2`/`vmap2`, a `PartitionSpec` for `shard_map`.
  """
  name: Any                  # mapped axis name (pmap2/vmap2) or the mesh's axis names
  size: int | None
  treedef: Any               # of (positional args with statics as None, kwargs)
  n_leaves: int
  arg_axes: tuple            # the user's in_axes, one entry per positional argument
  sources: list              # (where, size) of every mapped argument
  out_axes: Any = None       # the user's out_axes
  out_tree: Any = None
  n_out: int = 0
  slot_axes: list = dataclasses.field(default_factory=list)
  out_slot_axes: list = dataclasses.field(default_factory=list)
  out_shardings: list = dataclasses.field(default_factory=list)
  in_states: list = dataclasses.field(default_factory=list)
  out_states: list = dataclasses.field(default_factory=list)
  static_reads: dict = dataclasses.field(default_factory=dict)
  static_writes: dict = dataclasses.field(default_factory=dict)
  processes: int = 1         # processes the mesh spans (each may pass its own part)
  named: list = dataclasses.field(default_factory=list)   # values of states state_in_axes names
  batch: Any = None          # (mesh, mesh axes) the first mapped argument is split over, if any
  local_io: bool = False     # inputs are each process's part, and so are the outputs


class _Entry:
  """One cache entry: its frozen `Plan`, and what the hot path needs to match and run it."""
  __slots__ = ('plan', 'in_states', 'out_states', 'n_out', 'out_tree', 'sig', 'last', 'fn',
               'stable', 'rewrites_all', 'keeps_reads', 'single_out', 'static_reads',
               'static_writes', 'local_io', 'weak', 'key', 'direct', 'layouts', 'off_mesh',
               'tree', 'flat')

  def __init__(self, plan: Plan, sig, last, local_io: bool = False):
    self.plan, self.fn = plan, plan.fn
    self.local_io = local_io   # each process passes, and gets back, its own part
    self.in_states, self.out_states = list(plan.in_states), list(plan.out_states)
    self.n_out, self.out_tree = plan.n_out, plan.out_tree
    self.static_reads, self.static_writes = plan.static_reads, plan.static_writes
    self.rewrites_all = self.in_states == self.out_states   # then new values = inputs next
    written = set(self.out_states).union(s for s, _ in self.static_writes)
    self.keeps_reads = written.isdisjoint(self.in_states)   # a call leaves its reads as they were
    self.single_out = plan.out_tree.num_nodes == 1 and plan.out_tree.num_leaves == 1
    self.sig, self.last = sig, _refs(last)   # `last`: references that keep nothing alive
    self.weak = False   # whether every value it tracks can be weakly referenced
    self.key: Any = None   # the cache key `_remember` files it under
    self.stable = None  # whether a call leaves the states with the signature it was traced for
    self.direct = False  # whether calls may skip the checks and let the guarded program check
    self.layouts: list | None = None  # in-states' shardings a direct call needs (layout-keeping)
    self.off_mesh = False   # whether its arguments are typed by another mesh (the key says)
    self.tree: Any = None   # the structure of a call's (args, kwargs), whose leaves it takes
    self.flat = False   # whether that is positional arguments of one array each

  def statics_hold(self) -> bool:
    """Whether every Python-valued state read still holds the value this entry was traced for."""
    return all(_same(s._value, v) for s, v in self.static_reads)


def _same(a: Any, b: Any) -> bool:
  if a is b:
    return True
  try:
    return type(a) is type(b) and bool(a == b)
  except Exception:   # values without a plain truth value compare by identity only
    return False


_STALE = object()  # never the current value: a reference to it forces a signature check
_stale = lambda: _STALE  # noqa: E731
_call_lock = threading.RLock()   # held by a call from reading its states to writing them back
CacheInfo = collections.namedtuple('CacheInfo', 'hits misses maxsize currsize')


def _refs(values: Sequence[Any]) -> list:
  """A reference per value that does not keep it alive where the value allows it."""
  out = []
  for v in values:
    try:
      out.append(weakref.ref(v))
    except TypeError:   # a container (dict, tuple): identity needs the object itself
      out.append(lambda v=v: v)
  return out


class _Retrace(Exception):
  """A program was asked to trace for other input types than it was built for."""


def _same_layouts(vals: list, layouts: list) -> bool:
  """Whether each value has the very sharding object of `layouts` (a program's outputs keep
  theirs from call to call, so this is the common case)."""
  try:
    return all(map(operator.is_, map(array_sharding, vals), layouts))
  except AttributeError:   # a state now holds something other than a jax.Array
    return False


def _guarded(program: Callable) -> Callable:
  """`program`, refusing (with `_Retrace`) to be traced for other inputs than its first.

  This lets a call hand the program the arguments and state values unchecked: `jax.jit`'s C++
  dispatch compares their types and shardings with the compiled program's, and traces again
  only when they differ, which this guard then turns into a fall back to the checked path.
  """
  first = []

  def guarded(*slots):
    leaves, tree = jax.tree.flatten(slots)
    sig = (tree, tuple(map(jax.typeof, leaves)))
    if not first:
      first.append(sig)
    elif sig != first[0]:
      raise _Retrace
    return program(*slots)
  return guarded


_aval = operator.attrgetter('aval')


def _values(states: Sequence[State]) -> list:
  # A comprehension, not map(attrgetter): Python 3.11+ specialises the slot read in place.
  return [s._value for s in states]


def _write(entry: '_Entry', outs: Sequence[Any], vals: list, name: str) -> None:
  """Write the states back from the program's outputs `outs` (those after its `n_out` own),
  all or none of them, by plain slot stores. `name` is the caller's, for the error when the
  outputs are tracers (the program ran under a raw JAX transform)."""
  i = entry.n_out
  if type(outs[i]) is not _ArrayImpl and _traced(outs[i:]):
    raise traced_write_error(f'{name} was called', outs[i:])
  states = entry.out_states
  old = vals if entry.rewrites_all else _values(states)
  try:
    for state in states:   # by index: zip over a slice costs the hot path 3x as much
      state._value = outs[i]
      i += 1
  except BaseException:   # KeyboardInterrupt included: no state is left half written
    for state, value in zip(states, old):
      state._value = value
    raise


def _batch_layout(flat: list, axes: Sequence[int | None]) -> tuple | None:
  """`(mesh, mesh axes)` the first mapped argument is laid out on along its mapped dimension,
  or None: on no mesh, or a trace's value."""
  for (_, x), axis in zip(flat, axes):
    if axis is not None:
      sharding = x.sharding if type(x) is _ArrayImpl else None
      if not isinstance(sharding, NamedSharding):
        return None
      return sharding.mesh, _axes.spec_entries(sharding.spec, x.ndim)[axis]
  return None


def _layout_of(x: Any) -> Any:
  """Where leaf `x` is laid out, alike for every spelling of one layout (`P('i')` and
  `P('i', None)`: a call's placement and a program's pinned output spell it differently)."""
  sharding = getattr(x, 'sharding', None)
  if isinstance(sharding, NamedSharding):
    return sharding.mesh, tuple(_axes.spec_entries(sharding.spec, x.ndim))
  return sharding


def _placed_elsewhere(x: jax.Array, where: Any) -> bool:
  """Whether array `x` must move to sharding `where`: laid out otherwise, or not on its mesh.

  On a mesh of one device a value on that device is laid out alike, but its type has no mesh
  while the program's outputs have one: unmoved, its next call would compile the program again.
  """
  mesh = getattr(x.sharding, 'mesh', None)
  return (mesh != where.mesh or not x.sharding.is_equivalent_to(where, x.ndim)
          or typed_elsewhere(x, where.mesh))


def _shape(value: Any) -> tuple:
  """Shape of a state's value (of its first leaf when it is a pytree)."""
  leaves = jax.tree.leaves(value)
  return tuple(getattr(leaves[0], 'shape', ())) if leaves else ()


def _traced(outs: Sequence[Any]) -> bool:
  """Whether the program ran under an enclosing JAX trace (its results are tracers)."""
  leaves = jax.tree.leaves(outs[0]) if len(outs) else ()
  return bool(leaves) and isinstance(leaves[0], jax.core.Tracer)  # pyright: ignore[reportAttributeAccessIssue]


def _module_of(fun: Any) -> Module | None:
  if isinstance(fun, Module):
    return fun
  owner = getattr(fun, '__self__', None)
  return owner if isinstance(owner, Module) else None


def state_label(state: State, paths: dict) -> str:
  """How messages name a state: its path in the module, else its `name=`, else its type."""
  if state in paths:
    return '.'.join(map(str, paths[state]))
  return state._name if state._name else f'<{type(state).__name__}>'


class StatefulMapping:
  """Maps a function that reads and writes `State`s over an axis (the engine behind `pmap2`).

  `pmap2`, `vmap2`, `jit` and `shard_map` make one; it can also be built directly, with any
  `mapping_fn`. A call traces `fun` once per call signature (argument structure, shapes,
  dtypes and shardings, static arguments, and the signature of the states it touches),
  compiles one program and caches it; later calls run the program and write the states back.

  Written states that differ across the mapped axis but are not selected by
  `state_out_axes` (and were not read with an axis from `state_in_axes`) follow
  `unexpected_out_state_mapping`:

  - `'auto'` (default): a state that the function only writes is gathered silently: its
    per-lane values are stacked along a new axis 0. A state that it reads and then writes is
    fed per lane when its current size along axis 0 equals the mapped size (it is read mapped
    along axis 0 and written back mapped along axis 0, like a declared per-lane buffer); this
    is decided afresh for every call signature, so a buffer gathered by a first call keeps its
    shape on the next. Otherwise it is gathered along a new axis 0 with a `UserWarning`, once
    per state and mapping. A state whose axis 0 happens to equal the mapped size is therefore
    treated as per lane: declare it in `state_in_axes`/`state_out_axes` when that is not meant.
  - `'warn'`: gathered along a new axis 0, with a `UserWarning` each time a program is built.
  - `'ignore'`: gathered along a new axis 0, silently.
  - `'raise'`: `meshstate.BatchAxisError` naming the state, raised while the program is built,
    before any state is written.

  A written state whose new value is the same on every lane (e.g. after `jax.lax.psum`) is
  written back unmapped under every policy. Random states are always split (one key per lane)
  and advance once per call. `jit` does not map, so the policy never applies to it.

  Args:
    fun: the function to map; it may read and write `State`s. A `Module` or a bound method of
      one lets state filters see each state's path in it.
    in_axes: the mapped axis of each positional argument: an int, None, or a tuple/pytree
      prefix with one entry per positional argument (`jax.vmap`'s form). Keyword arguments
      are mapped along axis 0.
    out_axes: where the mapped axis goes in each output (an int, None, or a pytree prefix).
    state_in_axes: `{axis: selector}` or a bare selector (`{0: selector}`): the states read
      per lane, and along which axis. A selector is a filter, a `State` subclass, a `State`, or
      an iterable of `State`s; the first matching entry wins. Others are broadcast.
    state_out_axes: the same form, for written states: each selected state is written back
      with the mapped axis at that position.
    unexpected_out_state_mapping: `'auto'`, `'warn'`, `'ignore'` or `'raise'`, as described
      above; any other value is a `ValueError`.
    axis_size: the mapped size; needed only when no argument and no declared state is mapped,
      and otherwise checked against them.
    axis_name: the name of the mapped axis, for collectives inside `fun`.
    name: the name used in error messages (default: `fun`'s `__name__`).
    mapping_fn: how the pure function is mapped: `jax.vmap` (default), `jax.pmap`, any
      callable with their calling convention, or one of meshstate's own engines. A callable is
      called as `mapping_fn(pure_fun, in_axes=..., out_axes=..., axis_name=...,
      axis_size=...)`, where `pure_fun(*user_args, state_values, **kwargs)` returns
      `(outputs, new_state_values)`: the user's positional arguments come first, in their own
      positions.
    static_argnums: positional arguments passed to `fun` as Python values (hashable; a new
      value traces again). None means none.
    static_argnames: keyword arguments passed to `fun` as Python values. None means none.
    donate_argnums: positional arguments whose buffers the program may reuse for its outputs.
    donate_states: donate the buffers of the states the call reads and rewrites.
    static_argname: the argument name that error messages use for `static_argnums` (`pmap2`
      passes `'static_broadcasted_argnums'`).

  Attributes:
    origin_fun: the function that was mapped.
    state_in_axes: `state_in_axes` normalised to `{axis: predicate}`.
    state_out_axes: `state_out_axes` normalised to `{axis: predicate}`.
    static_argnums: the static positions, as a tuple.
    static_argnames: the static keyword names, as a tuple.

  Example:
    >>> import jax, jax.numpy as jnp, meshstate
    >>> from meshstate.transform import StatefulMapping
    >>> count = meshstate.ShortTermState(jnp.zeros(()))
    >>> def step(x):
    ...   count.value = count.value + jax.lax.psum(1.0, 'i')
    ...   return x * 2
    >>> f = StatefulMapping(step, in_axes=0, out_axes=0, axis_name='i')
    >>> f(jnp.arange(3.)).tolist(), float(count.value)
    ([0.0, 2.0, 4.0], 3.0)
  """
  _sized = True   # the mapping has one size (pmap2/vmap2); shard_map's comes from its mesh
  default_cache_size = 64   # programs kept per mapping (least recently used ones go first)
  # Set by `functools.update_wrapper` (declared for the type checker).
  __name__: str
  __qualname__: str
  __wrapped__: Callable[..., Any]

  def __init__(self, fun: Callable, in_axes: Any = 0, out_axes: Any = 0,
               state_in_axes: Any = None, state_out_axes: Any = None,
               unexpected_out_state_mapping: str = 'auto', axis_size: int | None = None,
               axis_name: Any = None, name: str | None = None,
               mapping_fn: Callable | Mapper = jax.vmap,
               static_argnums: int | Sequence[int] | None = (),
               static_argnames: str | Sequence[str] | None = (),
               donate_argnums: int | Sequence[int] = (), donate_states: bool = False,
               static_argname: str = 'static_argnums'):
    if not callable(fun):
      raise TypeError(f'StatefulMapping needs a callable, got {type(fun).__name__}.')
    if not (callable(mapping_fn) or isinstance(mapping_fn, Mapper)):
      raise TypeError(f'mapping_fn must be a function called like jax.vmap or jax.pmap, got '
                      f'{mapping_fn!r}.')
    if unexpected_out_state_mapping not in _POLICIES:
      raise ValueError(f'unexpected_out_state_mapping must be one of {_POLICIES}, '
                       f'got {unexpected_out_state_mapping!r}.')
    if axis_size is not None and (not isinstance(axis_size, int) or axis_size < 1):
      raise ValueError(f'axis_size must be a positive int, got {axis_size!r}.')
    self.origin_fun = fun
    self.in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    self.out_axes = out_axes
    self.state_in_axes = _axes.normalize_state_axes(state_in_axes, 'state_in_axes')
    self.state_out_axes = _axes.normalize_state_axes(state_out_axes, 'state_out_axes')
    self.unexpected_out_state_mapping = unexpected_out_state_mapping
    self.axis_size = axis_size
    self.axis_name = axis_name
    self.name = name or getattr(fun, '__name__', type(fun).__name__)
    self.mapping_fn = mapping_fn
    if isinstance(mapping_fn, Mapper):
      self._mapper = mapping_fn
    elif mapping_fn is jax.vmap:
      self._mapper = VmapMapper()
    else:
      self._mapper = CustomMapper(mapping_fn)
    self._name = axis_name if axis_name is not None else f'_meshstate_axis{next(_names)}'
    static_argnums = _axes.normalize_argnums(
        () if static_argnums is None else static_argnums, static_argname)
    static_argnames = ((static_argnames,) if isinstance(static_argnames, str)
                       else tuple(static_argnames or ()))
    self.static_argnums, self.static_argnames = static_argnums, static_argnames
    self._static_argname = static_argname
    self._static, self._static_names = _axes.link_static(fun, static_argnums, static_argnames)
    self._donate = _axes.normalize_argnums(donate_argnums, 'donate_argnums')
    overlap = set(self._static) & set(self._donate)
    if overlap:
      raise ValueError(f'Arguments {sorted(overlap)} are both static and donated '
                       f'(static_argnums={self._static}, donate_argnums={self._donate}).')
    self._donate_states = donate_states
    self._has_static = bool(self._static or self._static_names)
    self._cache: dict[Any, list[_Entry]] = {}
    self._flat: dict[tuple, list[_Entry]] = {}   # the same entry lists, keyed by avals alone
    self._lru: collections.OrderedDict[_Entry, None] = collections.OrderedDict()
    self.cache_size = self.default_cache_size
    self._ncalls = self._misses = 0
    self._direct: _Entry | None = None   # the entry a call of its structure may run unchecked
    self._retraces = 0
    self._typed_reads: list[weakref.ref] = []   # see _remember_typed
    self._on_meshes: dict[Mesh, StatefulMapping] = {}   # copies run under a context mesh
    self._warned: set[State] = set()
    self._touched: dict[State, None] = {}
    self._bound: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    functools.update_wrapper(self, fun, updated=())

  def __get__(self, obj: Any, objtype: Any = None) -> 'StatefulMapping':
    """Used as a method decorator: the mapping of the method bound to `obj` (one per object)."""
    if obj is None:
      return self
    try:
      return self._bound[obj]
    except (KeyError, TypeError):
      pass
    bound = self._rebound(self.origin_fun.__get__(obj, objtype))
    try:
      self._bound[obj] = bound
    except TypeError:   # not weakly referenceable: bind afresh each time
      pass
    return bound

  def _rebound(self, fun: Callable) -> 'StatefulMapping':
    """A copy of this mapping (same configuration, empty caches) of another function."""
    new = object.__new__(type(self))
    new.__dict__.update(self.__dict__)
    new.origin_fun = new.__wrapped__ = fun
    new._cache, new._flat, new._warned, new._touched = {}, {}, set(), {}
    new._lru, new._ncalls, new._misses = collections.OrderedDict(), 0, 0
    new._direct, new._retraces, new._on_meshes, new._typed_reads = None, 0, {}, []
    new._bound = weakref.WeakKeyDictionary()
    return new

  # -- the per-call hot path -------------------------------------------------------------------

  def __call__(self, *args, **kwargs):
    entry = self._direct
    if entry is not None:
      # Direct path: the entry the last call ran. Its guarded program checks the arguments'
      # and states' types in jax.jit's C++ dispatch, and refuses other ones. Arguments that
      # are one array each are passed as they are; others (pytrees, keywords) as their leaves,
      # when they have the entry's structure. Inside a meshstate trace, states go through it.
      if frames_open[0] and _local.stack:
        entry = None
      elif entry.flat and not kwargs:
        leaves = args
      else:
        leaves, tree = jax.tree.flatten((args, kwargs))
        if tree != entry.tree:
          entry = None
    if entry is not None:
      _call_lock.acquire()   # not `with`: its __enter__/__exit__ calls cost twice as much
      try:
        vals = [s._value for s in entry.in_states]
        try:
          if entry.layouts is not None and not _same_layouts(vals, entry.layouts):
            raise _Retrace   # jax.jit takes another sharding, but the program keeps the old one
          outs = entry.fn(*leaves, *vals)
        except _Retrace:
          self._undirect()
        # Not a JAX type, or laid out elsewhere (JAX's shard_map raises KeyError on a value
        # typed by another Explicit mesh): the checked path names the argument, or moves it.
        except (TypeError, ValueError, KeyError):
          pass
        else:
          self._ncalls += 1
          if entry.out_states:
            _write(entry, outs, vals, self.name)
          return outs[0] if entry.single_out else entry.out_tree.unflatten(outs[:entry.n_out])
      except Exception as err:   # JAX's API boundary, inline: its decorator's frame costs a call
        filter_traceback(err)
        raise
      finally:
        _call_lock.release()
    try:
      return self._checked(*args, **kwargs)
    except Exception as err:   # filtered by _checked's API boundary: drop this frame too
      drop_own_frame(err)
      raise

  @api_boundary
  def _checked(self, *args, **kwargs):
    """A call with every check: the cache looked up by signature, the states' values compared."""
    runs = self._here()
    if runs is not self:
      return runs._checked(*args, **kwargs)
    if _local.stack:
      return self._call_nested(*self._signature(args, kwargs))
    with _call_lock:   # read → run → write-back: atomic with respect to other meshstate calls
      # Fast path: positional array arguments (one leaf each), states as the last call left
      # them (each still holds the very value the entry last saw).
      entries = hit = None
      if not kwargs and not self._has_static:
        try:
          entries = self._flat.get(tuple(map(_aval, args)))
        except AttributeError:
          pass
      if entries:
        entry, leaves = entries[-1], args
        vals = [s._value for s in entry.in_states]
        hit = all(map(operator.is_, vals, map(operator.call, entry.last))) and (
            not entry.static_reads or entry.statics_hold())
      if not hit:
        entry, leaves, vals = self._prepare(args, kwargs)
      self._lru.move_to_end(entry)
      self._ncalls += 1
      # Run the program, write the states back (the slots themselves), return the outputs.
      moved = False
      try:
        outs = entry.fn(*leaves, *vals)
      except _Retrace:   # traced for other types than the entry's (a JAX setting changed)
        self._forget(entry)
        entry, leaves, vals = self._prepare(args, kwargs)
        outs = entry.fn(*leaves, *vals)
      except ValueError:   # jit takes its inputs on given shardings, and some were elsewhere
        if not entry.plan.in_shardings:
          raise
        leaves, vals = self._moved(entry, leaves, vals)
        outs = entry.fn(*leaves, *vals)
        moved = True
      n, last = entry.n_out, None
      if entry.out_states:
        _write(entry, outs, vals, self.name)
        if entry.rewrites_all:
          last = outs[n:]
      for state, value in entry.static_writes:
        state._value = value
      if hit and entry.keeps_reads and entry.stable:
        pass   # the states hold the values `entry.last` refers to
      elif last is not None and entry.stable and entry.weak:
        try:
          entry.last = list(map(weakref.ref, last))
        except TypeError:   # a state now holds a value without weak references
          entry.last = _refs(last)
      else:
        self._settle(entry, _values(entry.in_states) if last is None else last)
      # The direct path passes the arguments' own leaves: not those moved for this call.
      if entry.direct and not moved and not entry.off_mesh and not self._has_static and (
          self._direct_pays()):
        self._make_direct(entry)
    if entry.local_io:
      outs = to_local(list(outs[:n]))
    return outs[0] if entry.single_out else entry.out_tree.unflatten(outs[:n])

  def _moved(self, entry: _Entry, leaves: Sequence[Any], vals: list) -> tuple[list, list]:
    """The arguments and state values on the shardings the program takes them on.

    The states are left holding their moved values, as after a first call.
    """
    n = len(leaves)
    moved = jax.device_put([*leaves, *vals], list(entry.plan.slot_shardings()))
    if not _traced(moved[n:]):
      for state, value in zip(entry.in_states, moved[n:]):
        state._value = value
    return moved[:n], moved[n:]

  def _here(self) -> 'StatefulMapping':
    """The mapping a call made now runs: this one, or under `jax.set_mesh(mesh)` a pmap2
    without a mesh of its own as `pmap2(mesh=mesh)` (one copy, with its own cache, per mesh)."""
    mesh = self._mapper.context_mesh()
    if mesh is None:
      return self
    if self.axis_name not in mesh.axis_names:
      raise ValueError(f'{self.name} was called under a context mesh (jax.set_mesh) with axes '
                       f'{dict(mesh.shape)}; without mesh= of its own, a pmap2 maps over the '
                       f'axis of that mesh named by axis_name, and axis_name='
                       f'{self.axis_name!r} names none. Name one of its axes, or pass mesh=.')
    with _call_lock:
      mapping = self._on_meshes.get(mesh)
      if mapping is None:
        mapping = self._on_meshes[mesh] = self._rebound(self.origin_fun)
        mapping._mapper = mapping.mapping_fn = self._mapper.on_mesh(mesh)
    return mapping

  def _make_direct(self, entry: _Entry) -> None:
    if self._mapper.keeps_layout:   # a state resharded since must go the checked way
      vals = _values(entry.in_states)
      if not all(isinstance(v, _ArrayImpl) for v in vals):
        return
      entry.layouts = list(map(array_sharding, vals))
    self._direct = entry

  def _undirect(self) -> None:
    """The direct path's entry met other types: the call goes on as a checked one."""
    self._direct = None
    self._retraces += 1

  def _direct_pays(self) -> bool:
    # Each refusal costs a failed trace in jax.jit: a mapping whose calls keep changing types
    # (alternating shapes, say) is better served by the checked path's lookup alone.
    return self._retraces < 8 or self._retraces * 64 <= self._ncalls

  def cache_info(self) -> CacheInfo:
    """Programs cached per call signature: `CacheInfo(hits, misses, maxsize, currsize)`.

    Hits and misses count lookups: calls (also those traced inside another transform), and
    `explain` and `lower`, which trace a program on a miss too.

    Example:
      >>> import jax.numpy as jnp, meshstate
      >>> f = meshstate.transform.jit(lambda x: x + 1)
      >>> _ = f(jnp.ones(2)); _ = f(jnp.ones(2)); _ = f(jnp.ones(3))
      >>> info = f.cache_info()
      >>> info.misses, info.currsize, info.maxsize == f.cache_size
      (2, 2, True)
    """
    infos = [(m._ncalls, m._misses, len(m._lru)) for m in (self, *self._on_meshes.values())]
    calls, misses, size = map(sum, zip(*infos))
    return CacheInfo(calls - misses, misses, self.cache_size, size)

  def cache_clear(self) -> None:
    """Forget every cached program (the next call of each signature traces again).

    Example:
      >>> import jax.numpy as jnp, meshstate
      >>> f = meshstate.transform.jit(lambda x: x + 1)
      >>> _ = f(jnp.ones(2)); f.cache_clear(); f.cache_info().currsize
      0
    """
    with _call_lock:
      self._cache.clear()
      self._flat.clear()
      self._lru.clear()
      self._ncalls = self._misses = self._retraces = 0
      self._direct = None
      self._on_meshes.clear()
      self._typed_reads = []

  def _prepare(self, args: tuple, kwargs: dict) -> tuple[_Entry, list, list]:
    """The general path: the entry for any arguments (traced on a miss), leaves, state values."""
    sig = self._signature(args, kwargs)
    key, leaves = sig[0], sig[1]
    entry = self._lookup(*sig)
    vals = _values(entry.in_states)
    if entry.off_mesh:
      return entry, *self._moved(entry, leaves, vals)
    if entry.local_io:   # this process's parts of the arguments, as one global array each
      return entry, to_global(leaves, list(entry.plan.in_shardings[:len(leaves)])), vals
    if not kwargs and not self._has_static and len(leaves) == len(args) and all(
        map(operator.is_, leaves, args)):
      self._flat[key[1]] = self._cache[key]   # later calls like this one take the fast path
    return entry, leaves, vals

  def _settle(self, entry: _Entry, last: Sequence[Any]) -> None:
    """After a call: references to `last`, the values the entry's in-states hold now.

    After an entry's first call it decides whether its writes keep the state signature it was
    traced for. If so the next call can match it by identity alone; if not (a write changed a
    shape), every call re-checks the signature.
    """
    if entry.stable is None:
      entry.stable = tuple(map(self._sig, last)) == entry.sig
      entry.weak = all(isinstance(r, weakref.ref) for r in _refs(last))
    entry.last = _refs(last) if entry.stable else [_stale] * len(last)

  def _signature(self, args: tuple, kwargs: dict) -> tuple:
    """`(cache key, leaves, treedef, args, kwargs, static)`, static arguments split off."""
    static = ()
    if self._has_static:
      args, kwargs, static = self._split_static(args, kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    key = (treedef, self._avals(args, kwargs, leaves), static)
    if self._mapper.follows_context:   # shard_map without mesh=: the context mesh of this call
      key += (self._mapper.user_mesh,)
    if self._mapper.spans_processes():   # local parts and global arrays give other programs
      key += (tuple(map(is_global, leaves)),)
    if _local.stack:   # traced inside another transform: the program depends on which one
      key += (context_key(),)
    return key, leaves, treedef, args, kwargs, static

  def _call_nested(self, key, leaves, treedef, args, kwargs, static):
    """A call traced inside another transform: states are read and written through it."""
    self._ncalls += 1   # a lookup, as a call at the top level is (`cache_info`)
    entry = self._lookup(key, leaves, treedef, args, kwargs, static)
    if (entry.out_states or entry.static_writes) and not in_frame_trace():
      raise traced_write_error(f'{self.name} writes states and was called inside a meshstate '
                               f'transform, but', leaves)
    vals = [s.value for s in entry.in_states]
    outs = entry.fn(*leaves, *vals)
    n = entry.n_out
    for state, value in (*zip(entry.out_states, outs[n:]), *entry.static_writes):
      state.value = value
    return entry.out_tree.unflatten(outs[:n])

  def _avals(self, args, kwargs, leaves) -> tuple:
    try:
      return tuple(map(_aval, leaves))   # jax.Arrays and tracers: what jax.typeof reads
    except AttributeError:
      pass
    try:
      return tuple(map(jax.typeof, leaves))
    except TypeError:
      raise self._bad_leaf(args, kwargs) from None

  def _lookup(self, key, leaves, treedef, args, kwargs, static) -> _Entry:
    """The entry for `key` whose traced state signature matches the states now (else trace)."""
    with _call_lock:   # one thread traces a new signature; the others then find it cached
      entries = self._cache.get(key, ())
      entry = self._match(entries)
      if entry is None and entries and not _local.stack and self._place_for(entries[-1]):
        entry = self._match(entries)
      if entry is None:
        entry, _ = self._compile(key, treedef, leaves, args, kwargs, static)
      return entry

  def _place_for(self, entry: _Entry) -> bool:
    """Move the states where `entry`'s program reads them, as its first call did (those whose
    shapes and dtypes are its own); whether it has places to move them to.

    A state replaced by an array laid out elsewhere (another mesh's) may then match the entry
    again, instead of tracing a new program on every call.
    """
    shardings = entry.plan.slot_shardings()
    if not shardings:
      return False
    avals = (lambda sig: sig[0]) if self._mapper.keeps_layout else (lambda sig: sig)
    pairs = [(state, sharding) for state, sharding, sig in zip(
        entry.in_states, shardings[len(shardings) - len(entry.in_states):], entry.sig)
        if _shapes(state._value) == _shapes(avals(sig))]
    self._placed([p[0] for p in pairs], None, [p[1] for p in pairs])
    return True

  def _entry(self, args: tuple, kwargs: dict) -> tuple[_Entry, list, list]:
    """The cache entry for these arguments (traced, not run, on a miss), leaves, state values."""
    sig = self._signature(args, kwargs)
    self._ncalls += 1
    entry = self._lookup(*sig)
    return entry, sig[1], [s.value for s in entry.in_states]

  def _sig(self, value: Any) -> Any:
    sig = jax.tree.map(jax.typeof, value)
    # Where each leaf is laid out, which the program keeps (a nested call takes its values
    # as they come, concrete or the enclosing trace's, and keeps nothing).
    if self._mapper.keeps_layout and not _local.stack:
      return sig, tuple(map(_layout_of, jax.tree.leaves(value)))
    return sig

  def _match(self, entries: Sequence[_Entry]) -> _Entry | None:
    """The newest entry traced for the current signature of its states, if any."""
    for entry in reversed(entries):
      if not all(_same(s.value, v) for s, v in entry.static_reads):
        continue
      vals = [s.value for s in entry.in_states]   # through enclosing trace frames, if any
      if all(map(operator.is_, vals, [r() for r in entry.last])) or tuple(
          map(self._sig, vals)) == entry.sig:
        return entry
    return None

  # -- signature helpers -----------------------------------------------------------------------

  def _split_static(self, args: tuple, kwargs: dict):
    for i in self.static_argnums:
      if not -len(args) <= i < len(args) and i not in self._static_by_keyword(kwargs):
        raise ValueError(f'{self._static_argname} contains {i}, but {self.name} was called with '
                         f'{len(args)} positional argument{"s" * (len(args) != 1)}; it must '
                         f'be in range [{-len(args)}, {len(args)}).')
    args, static = _axes.split_static(args, self._static)
    if self._static_names:
      named = tuple((k, kwargs[k]) for k in self._static_names if k in kwargs)
      for k, v in named:
        try:
          hash(v)
        except TypeError:
          raise ValueError(f'Static argument {k!r} must be hashable, got {type(v).__name__}.'
                           ) from None
      kwargs = {k: v for k, v in kwargs.items() if k not in self._static_names}
      static = static + named
    return args, kwargs, static

  def _static_by_keyword(self, kwargs: dict) -> set[int]:
    """Static positions whose parameter was passed by keyword (linked like `jax.jit`)."""
    if not kwargs:
      return set()
    names = _axes.positional_names(self.origin_fun)
    return {i for i in self.static_argnums if -len(names) <= i < len(names)
            and names[i] in kwargs}

  @staticmethod
  def _with_static(args: Any, kwargs: dict, static: tuple):
    if not static:
      return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for k, v in static:
      if isinstance(k, int):
        args[k] = v
      else:
        kwargs[k] = v
    return tuple(args), kwargs

  def _bad_leaf(self, args, kwargs) -> TypeError:
    for path, leaf in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
      try:
        jax.typeof(leaf)
      except TypeError:
        return TypeError(f'{self.name}: argument {_axes.arg_name(path)} is a '
                         f'{type(leaf).__name__}, not an array; mark it static ('
                         f'{self._static_argname}).')
    return TypeError(f'{self.name}: arguments must be arrays.')

  # -- layout hooks (pmap2/vmap2: one int axis per slot; shard_map overrides) ------------------

  def _layout_args(self, treedef, leaves, args, kwargs, paths) -> Layout:
    in_axes = self.in_axes
    if isinstance(in_axes, tuple):
      if len(in_axes) != len(args):
        raise ValueError(f'in_axes has {len(in_axes)} entries but {self.name} was called with '
                         f'{len(args)} positional arguments; in_axes must be an int, None, or a '
                         f'tuple with one entry per positional argument.')
      per_arg = in_axes
    else:
      per_arg = (in_axes,) * len(args)
    if not self._mapper.mapped:
      return Layout(None, None, treedef, len(leaves), per_arg, [],
                    slot_axes=[None] * len(leaves))
    axes = _axes.leaf_axes((per_arg, 0), (args, kwargs), 'in_axes', 'argument')
    flat = jax.tree_util.tree_flatten_with_path((args, kwargs))[0]
    processes = jax.process_count() if self._mapper.spans_processes() else 1
    local_io = processes > 1 and self._local_inputs(flat)
    sources = [(_axes.arg_name(p), jnp.shape(x)[a] * (processes if local_io else 1))
               for (p, x), a in zip(flat, axes) if a is not None]
    size = (_axes.mapped_size(sources, self.axis_size)
            if sources or self.axis_size is not None else None)
    return Layout(self._name, size, treedef, len(leaves), per_arg, sources, self.out_axes,
                  slot_axes=list(axes), processes=processes, local_io=local_io,
                  batch=_batch_layout(flat, axes))

  def _local_inputs(self, flat: list) -> bool:
    """Whether the arguments are each process's part (else they span all processes)."""
    spanning = [is_global(x) for _, x in flat]
    if any(spanning) and not all(spanning):
      names = [_axes.arg_name(p) for (p, _), g in zip(flat, spanning) if not g]
      raise ValueError(f'{self.name} was called with both arrays that span all processes and '
                       f'process-local ones ({", ".join(names)}); pass every argument as this '
                       f"process's part (as with jax.pmap), or every one as a global array.")
    return not (spanning and all(spanning))

  def _size_from_states(self, leaves: list, layout: Layout, body: Callable, paths: dict) -> int:
    """With no mapped argument: the size along the axis of the first declared state read."""
    class Found(Exception):
      pass

    def view(state, base):
      axis = self._first(self.state_in_axes, state, paths)
      shape = _shape(base)
      if axis is not None and not isinstance(state, RandomState):
        what = f'state_in_axes for {self._describe(state, paths)}'
        raise Found((what, shape[_axes.check_axis(axis, len(shape), what, shape)]))
      return placeholder(base)

    try:
      discover(lambda probe: _eval_shape(probe, leaves), body, view)
    except Found as found:
      layout.sources = [found.args[0]]
      return _axes.mapped_size(layout.sources, self.axis_size)
    raise ValueError(f'{self.name}: cannot infer the mapped size: no argument is mapped and no '
                     f'state read is declared in state_in_axes; pass axis_size=.')

  def _layout_state_in(self, state: State, paths: dict, fed: dict) -> int | None:
    if state in fed:
      return fed[state]
    return self._first(self.state_in_axes, state, paths)

  def _lane_names(self, layout: Layout) -> Any:
    return layout.name

  def _viewer(self, layout: Layout, paths: dict, fed: dict,
              reader: Reader | None) -> Callable[[State, Any], Any] | None:
    """The `view` of a discovery: lane views when mapped, else reader slots (or the values)."""
    if self._mapper.mapped:
      return lambda state, base: self._view(state, base, layout, paths, fed, reader)
    if reader is not None:   # the whole value: its own type (an Explicit mesh's included)
      return lambda state, base: reader.read_like(state, base)
    return None

  def _view(self, state: State, base: Any, layout: Layout, paths: dict, fed: dict,
            reader: Reader | None) -> Any:
    """The body's view of `state` on first read during discovery (a slot of `reader`'s)."""
    if isinstance(state, RandomState):
      key = base if reader is None else reader.read(state, base)
      return lane_key(key, self._lane_names(layout))[1]
    axis = self._layout_state_in(state, paths, fed)
    if axis is None:
      if reader is not None:
        return reader.read(state, base)
      return placeholder(base)
    for leaf in jax.tree.leaves(base):
      shape = jnp.shape(leaf)
      if type(axis) is int and -len(shape) <= axis < len(shape) and (
          shape[axis] == layout.size):   # valid: skip building the message (a hot loop)
        axis %= len(shape)
        continue
      what = f'state_in_axes for {self._describe(state, paths)}'
      axis = _axes.check_axis(axis, len(shape), what, shape)
      if shape[axis] != layout.size and shape[axis] * layout.processes != layout.size:
        where = ', '.join(w for w, _ in layout.sources) or 'axis_size'
        raise ValueError(f'{what}: maps axis {axis} of size {shape[axis]}, but the mapped size '
                         f'is {layout.size} (from {where}).')
    if reader is not None:
      return reader.read(state, base, lambda shape: shape[:axis] + shape[axis + 1:],
                         frozenset({layout.name}), axis)
    return vary(lane_slice(placeholder(base), axis), layout.name)

  def _layout_outputs(self, disc, layout: Layout) -> list:
    out_avals = disc.out_tree.unflatten(disc.out_avals)
    axes = _axes.leaf_axes(self.out_axes, out_avals, 'out_axes', 'output', extra=1)
    flat = jax.tree_util.tree_flatten_with_path(out_avals)[0]
    for (path, _), axis, vma in zip(flat, axes, disc.out_vma):
      if axis is None and layout.name in vma:
        raise ValueError(f'out_axes is None for output{jax.tree_util.keystr(path)}, but its '
                         f'value differs across {self._axis_text()}; map it (e.g. '
                         f'out_axes=0) or reduce it with a collective first.')
    return axes

  def _axis_text(self) -> str:
    """'the mapped axis', named when the user named it."""
    return 'the mapped axis' + ('' if self.axis_name is None else f' {self.axis_name!r}')

  def _layout_state_out(self, state: State, disc, in_axis, paths: dict) -> int | None:
    declared = self._first(self.state_out_axes, state, paths)
    what = self._describe(state, paths)
    if declared is not None:
      shape = disc.write_shape(state)
      return _axes.check_axis(declared, len(shape), f'state_out_axes for {what}', shape,
                              extra=1)
    if self._name not in disc.write_vma[state]:
      return None
    if in_axis is not None:
      return in_axis
    policy = self.unexpected_out_state_mapping
    if policy == 'raise':
      raise BatchAxisError(
          f'{what} is written with a value that differs across {self._axis_text()}, but '
          f'state_out_axes does not say how to map it. Declare it in state_out_axes, or reduce '
          f'it (e.g. with jax.lax.pmean) before writing.')
    if policy == 'warn' or (policy == 'auto' and state in disc.reads
                            and state not in self._warned):
      self._warned.add(state)
      warnings.warn(f'{what} is written with per-lane values but has no out axis in '
                    f'state_out_axes; it is gathered along axis 0.', UserWarning,
                    stacklevel=user_stacklevel())
    return 0

  def _auto_fed(self, disc, layout: Layout, fed: dict, paths: dict) -> dict[State, int]:
    """Read-modify-write states that policy 'auto' feeds per lane (size along 0 == mapped)."""
    if self.unexpected_out_state_mapping != 'auto' or not self._mapper.mapped:
      return {}
    more = {}
    for s in disc.writes:
      if (s in disc.reads and layout.name in disc.write_vma[s] and s not in fed
          and not isinstance(s, RandomState)
          and self._first(self.state_out_axes, s, paths) is None
          and self._first(self.state_in_axes, s, paths) is None):
        shape = _shape(s._value)
        if shape and shape[0] == layout.size:
          more[s] = 0
    return more

  # -- the slow path: discovery and program ----------------------------------------------------

  def _paths(self) -> dict[State, tuple]:
    module = _module_of(self.origin_fun)
    return module.state_paths() if module is not None else {}

  @staticmethod
  def _describe(state: State, paths: dict) -> str:
    path = paths.get(state)
    where = (f' at path {".".join(map(str, path))}' if path else
             f' {state._name!r}' if state._name else '')
    shapes = jax.tree.map(lambda x: tuple(getattr(x, 'shape', ())), state._value)
    return f'{type(state).__name__}{where} (shape {shapes})'

  @staticmethod
  def _first(table: dict | list, state: State, paths: dict) -> Any:
    path = paths.get(state, ())
    items = table.items() if isinstance(table, dict) else table
    for layout, pred in items:
      if pred(path, state):
        return layout
    return None

  def _compile(self, key, treedef, leaves, args, kwargs, static):
    mapper = self._mapper
    if mapper.spans_processes() and not _local.stack:
      # Every process must trace the same program; a mismatch would hang in a collective.
      assert_same_across_processes(re.sub(r' at 0x[0-9a-f]+', '', f'{self.name}: {key!r}'))
    paths = self._paths()
    layout = self._layout_args(treedef, leaves, args, kwargs, paths)
    fun = self.origin_fun

    def body(*lane_leaves):
      a, kw = treedef.unflatten(lane_leaves)
      a, kw = self._with_static(a, kw, static)
      return fun(*a, **kw)

    if mapper.mapped and layout.size is None and self._sized:
      layout.size = self._size_from_states(leaves, layout, body, paths)
    fed: dict[State, Any] = {}   # read-modify-write states that 'auto' feeds per lane
    # One trace when it can be lifted to the program (`_lift.py`), else a second one builds it.
    # Traced inside another transform, the states' values are its tracers, which a reader types
    # as lanes even when the program is traced again (an Explicit mesh's axes included).
    layout.named = [s._value for s in self._named_states()] + [
        s._value for s in map(operator.call, self._typed_reads) if s is not None]
    stopped_at = []   # the values whose reads stopped discovery (NeedMesh)
    blocks = mapper.unliftable(layout, leaves)
    lift = blocks is not None
    if _local.stack and blocks is None:
      blocks = never_blocks
    while True:
      reader = None if blocks is None else Reader(blocks)
      view = self._viewer(layout, paths, fed, reader)
      try:
        disc = discover(lambda probe: mapper.trace(probe, leaves, layout), body, view)
      except NeedAxis as need:   # a nested pmap2 asked this one's mesh for its axis
        if need.asker is mapper or not hasattr(mapper, 'add_axis'):
          raise
        mapper.add_axis(need)
        continue
      except NeedMesh as need:   # vmap2 read a state typed by a mesh: trace under it
        layout.named.append(need.value)
        stopped_at.append(need.value)
        blocks = mapper.unliftable(layout, leaves)
        continue
      more = self._auto_fed(disc, layout, fed, paths)
      if not more:
        break
      fed.update(more)

    self._warn_unread(disc, paths)
    if stopped_at:
      self._remember_typed(disc.reads, stopped_at)
    in_states = disc.reads
    random_in = [s for s in in_states if mapper.mapped and isinstance(s, RandomState)]
    out_states = list(disc.writes) + [s for s in random_in if s not in disc.write_vma]
    state_in = [None if s in random_in else self._layout_state_in(s, paths, fed)
                for s in in_states]
    state_in = [self._check_state_in(s, a, paths) for s, a in zip(in_states, state_in)]
    in_layout = dict(zip(in_states, state_in))
    state_out = [None if s in random_in else
                 self._layout_state_out(s, disc, in_layout.get(s), paths) for s in out_states]
    out_axes = (self._layout_outputs(disc, layout) if mapper.mapped
                else [None] * len(disc.out_avals))
    layout.out_tree, layout.n_out = disc.out_tree, len(disc.out_avals)
    layout.slot_axes += state_in
    layout.out_slot_axes = list(out_axes) + state_out
    layout.in_states, layout.out_states = in_states, out_states
    layout.static_reads, layout.static_writes = disc.static_reads, disc.static_writes

    if layout.batch is None and not _local.stack:
      layout.batch = mapper.typed_batch([*leaves, *(s._value for s in in_states)],
                                        layout.slot_axes)
    vals = self._placed(in_states, layout) if not _local.stack else [s.value for s in in_states]
    layout.out_shardings = self._kept_shardings(layout, disc, dict(zip(in_states, vals)),
                                                in_layout, state_out)
    program = None
    if lift and reader is not None:
      program = reader.program(disc, len(leaves), out_states, random_in, self._lane_names(layout))
    if program is None:
      program = self._program(body, random_in, layout, disc.out_avals)
    donate = self._donate_slots(args, in_states, out_states, len(leaves))
    entry = _Entry(mapper.plan(_guarded(program), layout, donate), tuple(map(self._sig, vals)),
                   vals, local_io=layout.local_io)
    # A direct call leaves checking the types to jax.jit; the context mesh,
    # a Python value read or each process's part of the arguments need the checked path.
    entry.tree, entry.flat = treedef, treedef == jax.tree.structure((tuple(leaves), {}))
    entry.off_mesh = _typed_off_mesh(entry.plan, leaves)
    entry.direct = (entry.plan.kind != 'custom' and
                    not layout.static_reads and not layout.static_writes and
                    not layout.local_io and not mapper.follows_context and
                    not mapper.spans_processes())
    self._remember(key, entry)
    self._touched.update(dict.fromkeys(in_states + out_states))
    return entry, vals

  def _remember_typed(self, reads: Sequence[State], values: list) -> None:
    """Remember the states whose reads stopped a discovery (`NeedMesh`): a later signature's
    discovery starts under their mesh, as if `state_in_axes` named them, and runs once."""
    ids = set(map(id, values))
    known = [r() for r in self._typed_reads]
    self._typed_reads = self._typed_reads + [
        weakref.ref(s) for s in reads
        if s not in known and any(id(x) in ids for x in jax.tree.leaves(s._value))]

  def _named_states(self) -> list[State]:
    """The states `state_in_axes` names (known before the function is traced)."""
    return [s for pred in self.state_in_axes.values() if isinstance(pred, _SameStates)
            for s in pred.states]

  def _warn_unread(self, disc, paths: dict) -> None:
    """Warn about states named in state_in_axes that the function does not read.

    A warning, not an error: which states a function reads may depend on a static argument.
    """
    unread = [s for s in self._named_states() if s not in disc.reads and s not in disc.static_reads]
    if unread:
      warnings.warn(f'{self.name}: state_in_axes names '
                    f'{", ".join(self._describe(s, paths) for s in unread)}, which it does not '
                    f'read on this call; the entry has no effect.', UserWarning,
                    stacklevel=user_stacklevel())

  def _remember(self, key: Any, entry: _Entry) -> None:
    """Cache `entry` under `key`, forgetting the least recently used one beyond `cache_size`."""
    self._misses += 1
    entry.key = key
    self._cache.setdefault(key, []).append(entry)
    self._lru[entry] = None
    while len(self._lru) > max(self.cache_size, 1):
      self._forget(next(iter(self._lru)))

  def _forget(self, entry: _Entry) -> None:
    del self._lru[entry]
    if self._direct is entry:
      self._direct = None
    entries = self._cache[entry.key]
    entries.remove(entry)
    if not entries:   # the fast path's lists are the same objects: drop those too
      del self._cache[entry.key]
      for flat_key in [k for k, v in self._flat.items() if v is entries]:
        del self._flat[flat_key]

  def _placed(self, states: Sequence[State], layout: Layout | None,
              shardings: Sequence[Any] | None = None) -> list:
    """The states' values, first moved (once) to where the program reads them (`shardings`,
    else the mapper's for `layout`).

    A state that arrives laid out as the program wants is passed without a copy on every call;
    without this, a state that is only read would be copied to the mesh on every call.
    """
    vals = [s._value for s in states]
    if shardings is None and layout is not None:
      shardings = self._mapper.slot_shardings(layout)
      shardings = shardings[layout.n_leaves:] if shardings else None
    if not shardings:
      return vals
    placed, moves, targets = [], [], []   # indices of values placed; of those one device_put
    for i, sharding in enumerate(shardings):   # moves (to `targets`, leaf by leaf)
      value = vals[i]
      arrays, tree = jax.tree.flatten(value)
      if not all(isinstance(x, jax.Array) for x in arrays):
        continue
      if not sharding.is_fully_addressable and not any(map(is_global, arrays)):
        if layout is None:   # each process's part: only a new trace knows its lanes
          continue
        vals[i] = self._to_processes(value, sharding, layout.slot_axes[layout.n_leaves + i],
                                     layout.size)
        placed.append(i)
        continue
      # A mapper that keeps layouts leaves a value on its mesh laid out over the other axes.
      where = [self._mapper.place(x, sharding) for x in arrays]
      if any(_placed_elsewhere(x, w) for x, w in zip(arrays, where)):
        moves.append(i)
        targets.append(tree.unflatten(where))
    if moves:   # one batched transfer: much cheaper than one device_put per state
      moved = put([vals[i] for i in moves], targets)
      for i, value in zip(moves, moved):
        vals[i] = value
    for i in placed + moves:
      if not _traced((vals[i],)):   # under a raw jax.jit: pass it on, never store a tracer
        states[i]._value = vals[i]
    return vals

  @staticmethod
  def _to_processes(value: Any, sharding: Any, axis: Any, size: int | None) -> Any:
    """A process-local state value as one array spanning the processes of `sharding`.

    Mapped with its local lanes only: this process's part. Otherwise it is the whole value,
    the same in every process.
    """
    if isinstance(axis, int) and _shape(value)[axis] != size:
      return to_global(value, sharding)
    return jax.device_put(jax.device_get(value), sharding)

  def _check_state_in(self, state: State, axis: Any, paths: dict) -> Any:
    if axis is None or not isinstance(axis, int):
      return axis
    shape = _shape(state._value)
    return _axes.check_axis(axis, len(shape), f'state_in_axes for {self._describe(state, paths)}',
                            shape)

  def _kept_shardings(self, layout, disc, vals, in_layout, state_out) -> list:
    """Per out slot, the sharding that keeps a rewritten state's layout (None: no constraint)."""
    mapper = self._mapper
    if not mapper.keeps_layout:
      return []
    kept = [None] * layout.n_out
    for state, out in zip(layout.out_states, state_out):
      if state not in vals or state not in disc.write_leaves:
        kept.append(None)
        continue
      leaves, tree = jax.tree.flatten(vals[state])
      written_tree, shapes = disc.write_leaves[state]
      axis = in_layout[state]
      # Each leaf written with its lane shape keeps its layout (a pytree's leaf by leaf).
      each = [mapper.keep(x, axis, out, layout) if self._lane_of(x, axis) == shape else None
              for x, shape in zip(leaves, shapes)] if tree == written_tree else []
      if jax.tree_util.treedef_is_leaf(tree):
        kept.append(each[0] if each else None)
      else:
        kept.append(each if any(s is not None for s in each) else None)
    return kept

  def _lane_of(self, x: Any, axis: Any) -> tuple | None:
    """The shape the body sees of a state's leaf `x` that `axis` lays out."""
    return _lane_shape(x, axis)

  def _program(self, body: Callable, random_in: list, layout: Layout,
               out_avals: list) -> Callable:
    names, n_leaves = self._lane_names(layout), layout.n_leaves
    in_states, out_states = layout.in_states, layout.out_states
    in_set, random_set = set(in_states), set(random_in)

    def program(*lane_slots):
      nxt = {}
      with Frame() as frame:
        for state, value in zip(in_states, lane_slots[n_leaves:]):
          if state in random_set:
            nxt[state], value = lane_key(value, names)
          frame.preset(state, value)
        out = body(*lane_slots[:n_leaves])
        stray = [s for s in frame.reads if s not in in_set]
        new = [nxt[s] if s in nxt else frame.value_of(s) for s in out_states]
      if stray:
        raise RuntimeError(f'{self.name} read {len(stray)} state(s) on its second trace that its '
                           f'first trace did not; state access must not depend on values.')
      out_leaves, tree = jax.tree.flatten(out)
      # Compare what the program returns, not the static parts of its containers: those may be
      # new objects on every trace (a flax TrainState's apply_fn and optimizer, for instance).
      if [(a.shape, a.dtype) for a in map(jax.typeof, out_leaves)] != [
          (a.shape, a.dtype) for a in out_avals]:
        raise RuntimeError(f'{self.name} returned {tree} on its second trace, {layout.out_tree} '
                           f'on its first.')
      return (*out_leaves, *(jax.tree.map(jnp.asarray, v) for v in new))
    return program

  def _donate_slots(self, args, in_states, out_states, n_leaves) -> tuple[int, ...]:
    slots = []
    if self._donate:
      offsets = list(itertools.accumulate([0] + [len(jax.tree.leaves(a)) for a in args]))
      for i in self._donate:
        if not -len(args) <= i < len(args):
          raise ValueError(f'donate_argnums contains {i}, but {self.name} was called with '
                           f'{len(args)} positional arguments.')
        i %= len(args)
        slots.extend(range(offsets[i], offsets[i + 1]))
    if self._donate_states:
      outs = set(out_states)
      slots.extend(n_leaves + j for j, s in enumerate(in_states) if s in outs)
    return tuple(slots)

  # -- introspection ---------------------------------------------------------------------------

  def explain(self, *args: Any, **kwargs: Any) -> Explanation:
    """The mesh, the in/out specs and the hand-written program that this call runs.

    Traces (without running) when the signature is new, and reads the `Plan` the engine runs:
    the returned `meshstate.sharding.Explanation` shows as its text, and its `run()` executes
    the hand-written program, giving the call's outputs and states.

    Args:
      *args: the positional arguments of the call to explain (arrays).
      **kwargs: its keyword arguments.

    Returns:
      A `meshstate.sharding.Explanation`.

    Example:
      >>> import jax, jax.numpy as jnp, meshstate
      >>> f = meshstate.transform.pmap2(lambda x: x * 2, axis_name='i')
      >>> print(str(f.explain(jnp.ones(2))).splitlines()[1])
      in_specs (arguments, then states read):
    """
    from meshstate.sharding import explain_plan
    entry, leaves, vals = self._here()._entry(args, kwargs)
    plan = entry.plan
    if plan.mesh is None:
      raise TypeError(f'explain shows the mesh program of pmap2 and shard_map; {self.name} '
                      f'runs a {plan.kind} program without a mesh.')
    paths = self.state_paths()
    label = lambda s: f'state {state_label(s, paths)}'  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(plan.treedef.unflatten(leaves))[0]
    in_names = [_axes.arg_name(p) for p, _ in flat] + [label(s) for s in plan.in_states]
    out_names = [f'out {i}' for i in range(plan.n_out)] + [label(s) for s in plan.out_states]
    return explain_plan(plan, leaves, vals, in_names, out_names)

  def lower(self, *args: Any, **kwargs: Any) -> Lowered:
    """The program for these arguments (arrays or `jax.ShapeDtypeStruct`s), lowered.

    Its `compile()` is called with the user's arguments, returns the user's output structure
    and writes the states back; `as_text()`, `cost_analysis()` and `args_info` are JAX's.

    Args:
      *args: the positional arguments, as arrays or `jax.ShapeDtypeStruct`s (with a sharding
        where it matters); static arguments as their Python values.
      **kwargs: the keyword arguments, in the same form.

    Returns:
      A `Lowered` program, whose `compile()` gives a `Compiled` one.

    Example:
      >>> import jax, jax.numpy as jnp, meshstate
      >>> total = meshstate.State(jnp.zeros(()))
      >>> def step(x):
      ...   total.value = total.value + jax.lax.psum(x, 'i')
      ...   return {'y': x * 2}
      >>> f = meshstate.transform.pmap2(step, axis_name='i')
      >>> compiled = f.lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
      >>> compiled(jnp.ones(2))['y'].tolist(), float(total.value)
      ([2.0, 2.0], 2.0)
    """
    from meshstate.transform._aot import Lowered
    runs = self._here()
    if runs is not self:
      return runs.lower(*args, **kwargs)
    entry, leaves, vals = self._entry(args, kwargs)
    if not hasattr(entry.fn, 'lower'):
      raise TypeError(f'{self.name} runs through a custom mapping_fn, which has no lower().')
    return Lowered(self, entry.plan, entry.fn.lower(*leaves, *vals), entry.key)

  def state_paths(self) -> dict[State, tuple]:
    """Each state's path inside the mapped Module (empty when the function is not a Module's)."""
    return self._paths()

  def touched_states(self) -> list[State]:
    """The states this mapping has read or written so far, first touch first."""
    return list(self._touched)

  def __repr__(self) -> str:
    return (f'StatefulMapping({self.name}, in_axes={self.in_axes!r}, out_axes={self.out_axes!r}, '
            f'axis_name={self.axis_name!r})')


def _typed_off_mesh(plan: Plan, leaves: Sequence[Any]) -> bool:
  """Whether an argument carries another Explicit mesh's type than the plan's.

  On an Explicit-axis mesh an array's sharding is part of its type, which a program on another
  mesh cannot take (`jax.pmap` and `jax.shard_map` fail on such inputs): it is moved first.
  (A state's value is part of the signature, so such a value is placed by a new entry.)
  """
  return plan.kind == 'shard_map' and any(typed_elsewhere(x, plan.mesh) for x in leaves)


def _eval_shape(probe: Callable, leaves: list) -> None:
  """Trace `probe` without any mapped axis (no jaxpr to analyse: nothing varies)."""
  jax.eval_shape(probe, *leaves)


def _shapes(tree: Any) -> list:
  """(shape, dtype) of each leaf of a value or of its abstract values."""
  return [(tuple(getattr(x, 'shape', ())), getattr(x, 'dtype', None))
          for x in jax.tree.leaves(tree)]


def _lane_shape(value: Any, axis: Any) -> tuple | None:
  shape = _shape(value)
  if isinstance(axis, int):
    return shape[:axis] + shape[axis + 1:]
  return shape


StatefulMapping.__module__ = 'meshstate.transform'
