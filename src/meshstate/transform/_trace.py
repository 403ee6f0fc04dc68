"""Discovery: an abstract trace that records which states a function reads and writes.

The trace runs the function once, without compiling, inside the same mapping that will run it
(`shard_map` for `pmap2`, `vmap` for `vmap2`). A state read for the first time is shown to the
body as its lane view: the mapped dimension removed for mapped states, a fresh per-lane key for
random states. For every written state the trace notes whether the new value varies across the
mapped axis, read from JAX's own typing (`shard_map`'s varying mesh axes, `vmap`'s batching).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from meshstate._state import Frame, State

__all__ = ['Discovery', 'discover', 'varies', 'vary', 'lane_key', 'lane_slice', 'placeholder',
           'vma_of']


def _vma(aval) -> frozenset:
  # The varying-axes set moved between JAX releases (`aval.vma`, then `aval.mat.varying`).
  vma = getattr(aval, 'vma', None)
  if vma is None:
    mat = getattr(aval, 'mat', None)
    vma = getattr(mat, 'varying', frozenset())
  return frozenset(vma)


def _batched(x: Any, name: Any) -> bool:
  # vmap has no public "is this batched" query; a BatchTracer of our named axis with a
  # batch dimension is the answer (jax._src, kept to this one helper).
  from jax._src.interpreters import batching
  if not isinstance(x, batching.BatchTracer) or not isinstance(x.batch_dim, int):
    return False
  axis_data = getattr(x._trace, 'axis_data', None)
  return getattr(axis_data, 'name', name) == name


def vma_of(value: Any) -> frozenset:
  """The mesh axes any leaf of `value` varies over, inside `shard_map`."""
  return frozenset().union(*(_vma(jax.typeof(x)) for x in jax.tree.leaves(value)
                             if isinstance(x, jax.core.Tracer)))


def varies(value: Any, name: Any) -> bool:
  """Whether any leaf of `value` differs across the mapped axis `name`."""
  for leaf in jax.tree.leaves(value):
    if isinstance(leaf, jax.core.Tracer) and (name in _vma(jax.typeof(leaf)) or
                                              _batched(leaf, name)):
      return True
  return False


def vary(value: Any, name: Any) -> Any:
  """`value` typed as varying across `name` (same numbers on every lane)."""
  keep = lax.axis_index(name) >= 0
  return jax.tree.map(lambda x: lax.select(jnp.broadcast_to(keep, jnp.shape(x)), x, x), value)


def _placeholder(x: Any) -> Any:
  if isinstance(x, jax.core.Tracer) or jax.dtypes.issubdtype(jnp.result_type(x),
                                                             jax.dtypes.prng_key):
    return x
  return lax.full(jnp.shape(x), 0, jnp.result_type(x))


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


@dataclasses.dataclass
class Discovery:
  """What one abstract trace of the function found."""
  reads: list[State]
  writes: list[State]
  write_varies: dict[State, bool]
  write_ndim: dict[State, int]      # rank of the (first leaf of the) lane value written
  write_shapes: dict[State, tuple]  # its shape
  write_vma: dict[State, frozenset]  # mesh axes the written value varies over (shard_map)
  out_vma: list[frozenset]
  out_tree: Any
  out_avals: list[Any]
  out_varies: list[bool]


def discover(run: Callable[[Callable], None], body: Callable[..., Any],
             view: Callable[[State, Any], Any], name: Any) -> Discovery:
  """Trace `body(*lane_args)` abstractly through `run` and report what it touched.

  `run(probe)` traces `probe` under the mapping with the lane views of the arguments;
  `view(state, value)` gives the body's view of a state on its first read.
  """
  found: dict[str, Any] = {}

  def probe(*lane_args):
    with Frame(view=view) as frame:
      out = body(*lane_args)
      written = {s: s._value for s in frame.writes}
      found['reads'] = list(frame.reads)
      found['writes'] = list(frame.writes)
      found['write_varies'] = {s: name is not None and varies(v, name) for s, v in written.items()}
      found['write_shapes'] = {s: tuple(jnp.shape((jax.tree.leaves(v) or [0])[0]))
                               for s, v in written.items()}
      found['write_ndim'] = {s: len(shape) for s, shape in found['write_shapes'].items()}
      leaves, found['out_tree'] = jax.tree.flatten(out)
      found['out_avals'] = [jax.typeof(x) for x in leaves]
      found['out_varies'] = [name is not None and varies(x, name) for x in leaves]
      found['write_vma'] = {s: vma_of(v) for s, v in written.items()}
      found['out_vma'] = [vma_of(x) for x in leaves]

  run(probe)
  return Discovery(**found)
