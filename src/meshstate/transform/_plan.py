"""The frozen `Plan` of one cache entry: what runs, on which mesh, with which specs.

A mapping traces a function once per call signature and turns what it found into a `Plan`.
The engine runs `plan.fn`; `explain`, `describe` and `lower` read the same plan, so what they
show is what runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax.sharding import NamedSharding

__all__ = ['Plan']


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """One traced program and how its slots relate to the user's arguments and states.

  A *slot* is one positional value of the program: an argument leaf, then one state's value
  (a pytree) per state read. `kind` says what `fn` is:

  - `'shard_map'`: `jit(shard_map(block_fn, mesh, in_specs, out_specs, axis_names=manual,
    check_vma=check_vma))`, with outputs pinned to `out_shardings` where given;
  - `'vmap'`: `jit(vmap(block_fn, in_axes, out_axes, axis_name, axis_size,
    spmd_axis_name))`, inputs placed on `in_shardings` and outputs on `out_shardings` when a
    mesh is given (`pmap2` with more lanes than devices);
  - `'jit'`: `jit(block_fn)`; `'custom'`: a user's `mapping_fn`.
  """
  kind: str
  fn: Callable                  # the program over global slots, as the engine calls it
  block_fn: Callable            # the function of one device's blocks (or one lane's slots)
  axis_name: Any
  size: int | None
  treedef: Any                  # of (positional args with statics as None, kwargs)
  n_leaves: int
  in_states: tuple
  out_states: tuple
  static_reads: tuple           # (state, value): Python-valued states read; part of the key
  static_writes: tuple          # (state, value): states the function sets to Python values
  in_layouts: tuple             # per input slot: a mapped axis (int or None) or a spec
  out_layouts: tuple            # per output slot, outputs first, then states written
  out_tree: Any
  n_out: int
  donate: tuple = ()
  mesh: Any = None
  manual: frozenset = frozenset()
  in_specs: tuple = ()
  out_specs: tuple = ()
  check_vma: bool = False
  fit: Any = None               # Explicit-axis meshes: reshards inputs to the specs first
  in_shardings: tuple = ()
  out_shardings: tuple = ()
  spmd_axis_name: Any = None

  def slot_shardings(self) -> tuple:
    """Where the program takes each input slot: its `in_shardings`, else the mesh and specs."""
    if self.in_shardings or self.mesh is None:
      return self.in_shardings
    return tuple(NamedSharding(self.mesh, spec) for spec in self.in_specs)
