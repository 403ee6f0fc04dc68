"""Discovery: one abstract trace that records which states a function reads and writes.

The trace runs the function once, without compiling, on lane-shaped inputs (what one device or
one vmap lane sees). A state read for the first time is shown to the body as its lane view: the
mapped dimension removed for mapped states, a fresh per-lane key for random states, the value
itself for a state holding a Python value (static: the body may branch on it). For every output
and written state the trace then tells which mapped axes the value differs across: read from the
traced jaxpr (`_varying.py`) for `jax.pmap` semantics, or from `shard_map`'s own varying-axes
typing when the program runs with `check_vma=True`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from meshstate._compat import vma
from meshstate._state import Frame, State, is_static_value
from meshstate.transform._axes import entry_axes, spec_entries
from meshstate.transform._varying import varying_axes

__all__ = ['Discovery', 'Traced', 'discover', 'vary', 'lane_key', 'lane_slice', 'placeholder',
           'vma_of', 'lane_aval', 'lane_sharding', 'trace_lanes', 'explicitly_typed']


def vma_of(value: Any) -> frozenset:
  """The mesh axes any leaf of `value` varies over, inside `shard_map(check_vma=True)`."""
  return frozenset().union(*(vma(jax.typeof(x)) for x in jax.tree.leaves(value)
                             if isinstance(x, jax.core.Tracer)))  # pyright: ignore[reportAttributeAccessIssue]


def vary(value: Any, name: Any) -> Any:
  """`value` marked as varying across `name` (same numbers on every lane)."""
  keep = lax.axis_index(name) >= 0
  return jax.tree.map(lambda x: lax.select(jnp.broadcast_to(keep, jnp.shape(x)), x, x), value)


def explicitly_typed(x: Any) -> bool:
  """Whether `x`'s type carries a sharding on a mesh with Explicit axes."""
  mesh = getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
  return bool(getattr(mesh, 'axis_names', ())) and (
      jax.sharding.AxisType.Explicit in tuple(mesh.axis_types))  # pyright: ignore


def _placeholder(x: Any) -> Any:
  # An enclosing trace's value is kept (with what it varies over), unless its type names the
  # whole of an Explicit mesh, which a body over some of its axes cannot take, or the mesh of
  # an enclosing shard_map body, which a body nested in that one cannot take either.
  if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):  # pyright: ignore
    return x
  varying = ()
  if isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
    mesh = jax.typeof(x).sharding.mesh
    if not explicitly_typed(x) and (not mesh.axis_names or
                                    mesh == jax.sharding.get_abstract_mesh()):
      return x
    varying = tuple(vma_of(x))   # the stand-in varies over what the value does
  fresh = lax.full(jnp.shape(x), 0, jnp.result_type(x))
  return lax.pcast(fresh, varying, to='varying') if varying else fresh


def placeholder(value: Any) -> Any:
  """A traced stand-in of `value`'s shape and dtype for discovery.

  Closing over the concrete array instead would carry its sharding type into the body, which
  breaks on Explicit-axis meshes; only shapes and dtypes matter to discovery.
  """
  return jax.tree.map(_placeholder, value)


def lane_slice(value: Any, axis: int) -> Any:
  """The lane-0 slice of a stacked value: the shape a mapped state has inside the body."""
  return jax.tree.map(lambda x: lax.index_in_dim(x, 0, axis, keepdims=False), value)


def lane_key(key: Any, name: Any) -> tuple[Any, Any]:
  """`(next global key, this lane's key)`: the global key advances once, lanes get distinct keys."""
  nxt, sub = jax.random.split(key)
  return nxt, jax.random.fold_in(sub, lax.axis_index(name))


def lane_aval(x: Any, shape: tuple, drop: int | None = None) -> jax.ShapeDtypeStruct:
  """The abstract value of one lane of `x`: its dtype with the lane's `shape` (dimension `drop`
  of `x` mapped away), and the sharding `lane_sharding` gives it."""
  aval = jax.typeof(x)
  return jax.ShapeDtypeStruct(shape, aval.dtype, weak_type=aval.weak_type,
                              sharding=lane_sharding(aval, drop))


def lane_sharding(aval: Any, drop: int | None = None) -> Any:
  """The sharding a lane of a value of type `aval` has in a `shard_map` or `vmap` body on the
  current abstract mesh, or None (untyped: no Explicit axis there, or `aval` not on it).

  Inside the body only the mesh's Explicit axes stay in a type (the manual ones are mapped,
  Auto ones are not typed), so each dimension keeps those of its axes; dimension `drop`, which
  the lane maps away, goes. A lane whose dimensions keep none is still typed on the mesh
  (replicated), as JAX types it: `vmap` batches such a lane over the mesh's axes. So is the
  lane of a value on no mesh, which the program places on this one first.
  """
  mesh = jax.sharding.get_abstract_mesh()
  explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types)
              if t == jax.sharding.AxisType.Explicit}
  own = getattr(aval, 'sharding', None)
  own_mesh = getattr(own, 'mesh', None)
  if not explicit or own_mesh is None:
    return None
  if not own_mesh.axis_names:
    spec = P()
  elif (own_mesh.axis_names, own_mesh.axis_sizes) != (mesh.axis_names, mesh.axis_sizes):
    return None   # typed by another mesh (moved onto this one first)
  else:
    spec = own.spec  # pyright: ignore[reportOptionalMemberAccess]
  entries = spec_entries(spec, len(aval.shape))
  if drop is not None:
    del entries[drop]
  kept = [tuple(a for a in entry_axes(e) if a in explicit) for e in entries]
  return jax.sharding.NamedSharding(mesh, P(*(k[0] if len(k) == 1 else k or None
                                             for k in kept)))


@dataclasses.dataclass(frozen=True)
class Traced:
  """A probe traced to a jaxpr on lane values, for `varying_axes` (or typed by `shard_map`)."""
  jaxpr: Any
  in_axes: list      # per input: the tracked axes it varies over
  tracked: frozenset
  typed: bool = False  # traced inside shard_map(check_vma=True): its types say what varies


def trace_lanes(probe: Callable, avals: Sequence[Any], in_axes: Sequence[frozenset],
                env: Sequence[tuple[Any, int]]) -> Traced:
  """Trace `probe` on lane values with the mapped axes bound (so collectives trace)."""
  jaxpr = jax.make_jaxpr(probe, axis_env=list(env))(*avals)
  return Traced(jaxpr, list(in_axes), frozenset(n for n, _ in env))


@dataclasses.dataclass
class Discovery:
  """What one abstract trace of the function found."""
  reads: list[State]
  writes: list[State]            # written with array values (carried out of the program)
  static_reads: dict[State, Any]   # Python-valued states read, and their values
  static_writes: dict[State, Any]  # states written with Python values, and those values
  write_vma: dict[State, frozenset]   # mapped axes each written value varies over
  write_leaves: dict[State, tuple]    # (treedef, shape of each leaf) of the lane value written
  out_vma: list[frozenset]
  out_tree: Any
  out_avals: list[Any]
  result_tree: Any = None        # of the traced result: (output leaves, written values)
  jaxpr: Any = None              # the traced ClosedJaxpr, when it was traced to one

  def write_shape(self, state: State) -> tuple:
    """The shape of (the first leaf of) the lane value written to `state`."""
    shapes = self.write_leaves[state][1]
    return tuple(shapes[0]) if shapes else ()


def discover(run: Callable[[Callable], Traced | None], body: Callable[..., Any],
             view: Callable[[State, Any], Any] | None) -> Discovery:
  """Trace `body(*lane_args)` abstractly through `run` and report what it touched.

  `run(probe)` traces `probe` on the lane views of the arguments and returns a `Traced` jaxpr
  to analyse, or None when the probe ran under `shard_map`'s varying-axes typing;
  `view(state, value)` gives the body's view of a state on its first read.
  """
  found: dict[str, Any] = {}

  def probe(*lane_args):
    with Frame(view=view) as frame:
      out = body(*lane_args)
      values = {s: frame.values[s] for s in frame.writes}
      static = {s: v for s, v in values.items() if is_static_value(v)}
      written = {s: v for s, v in values.items() if s not in static}
      found['reads'] = [s for s in frame.reads if s not in frame.static_reads]
      found['static_reads'] = dict(frame.static_reads)
      found['writes'], found['static_writes'] = list(written), static
      found['write_leaves'] = {s: (jax.tree.structure(v), [jnp.shape(x) for x in
                                                          jax.tree.leaves(v)])
                               for s, v in written.items()}
      leaves, found['out_tree'] = jax.tree.flatten(out)
      found['out_avals'] = [jax.typeof(x) for x in leaves]
      found['out_vma'] = [vma_of(x) for x in leaves]
      found['write_vma'] = {s: vma_of(v) for s, v in written.items()}
      result = leaves, list(written.values())
      found['result_tree'] = jax.tree.structure(result)
      return result

  traced = run(probe)
  found['jaxpr'] = traced.jaxpr if traced is not None else None
  if traced is not None and not traced.typed:
    axes = varying_axes(traced.jaxpr, traced.in_axes, traced.tracked)
    out_vma, write_vma = found['result_tree'].unflatten(axes)
    found['out_vma'] = out_vma
    found['write_vma'] = {s: frozenset().union(*jax.tree.leaves(v, is_leaf=_is_axes))
                          for s, v in zip(found['writes'], write_vma)}
  return Discovery(**found)


def _is_axes(x: Any) -> bool:
  return isinstance(x, frozenset)
