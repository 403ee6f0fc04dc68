"""Mappers: how an entry's program is traced (discovery) and run, for vmap, jit and user maps.

A mapper turns `body(*lane_slots) -> out_slots` into one callable over global slots. A *slot* is
one positional value of the program: an argument leaf or a state's value (a pytree). Each slot
has one mapped axis (an int) or None. Mappers also trace a probe abstractly (no compile) for
discovery, through the same mapping that will run it. The `Mesh` + `shard_map` mapper of
`pmap2` lives in `_mesh.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

__all__ = ['Mapper', 'VmapMapper', 'JitMapper', 'CustomMapper']


class Mapper:
  """Strategy of a `StatefulMapping`: how to trace (discovery) and run (program) its body."""
  mapped = True  # False for plain jit: no axis, nothing varies, random keys are not split

  def trace(self, probe: Callable, slots: Sequence[Any], axes: Sequence[int | None], size: int,
            name: str) -> None:
    raise NotImplementedError

  def build(self, body: Callable, axes: Sequence[int | None], out_axes: Sequence[int | None],
            size: int, name: str, donate: tuple[int, ...], layout: Any) -> Callable:
    raise NotImplementedError


class VmapMapper(Mapper):
  """`jax.vmap` under one `jax.jit` (the engine of `vmap2`)."""

  def trace(self, probe, slots, axes, size, name):
    jax.eval_shape(jax.vmap(probe, in_axes=tuple(axes), out_axes=None, axis_name=name,
                            axis_size=size), *slots)

  def build(self, body, axes, out_axes, size, name, donate, layout):
    mapped = jax.vmap(body, in_axes=tuple(axes), out_axes=tuple(out_axes), axis_name=name,
                      axis_size=size)
    return jax.jit(mapped, donate_argnums=donate)


class JitMapper(Mapper):
  """No mapping at all: the engine of the state-aware `jit`."""
  mapped = False

  def trace(self, probe, slots, axes, size, name):
    jax.eval_shape(probe, *slots)

  def build(self, body, axes, out_axes, size, name, donate, layout):
    return jax.jit(body, donate_argnums=donate)


class CustomMapper(VmapMapper):
  """A user's `mapping_fn`, called like `jax.vmap`/`jax.pmap` on a pure function.

  The pure function takes the user's positional arguments first, in their original positions
  (static ones as None), then the list of state values; keyword arguments pass through.
  Discovery traces with `jax.vmap`, which maps the same way.
  """

  def __init__(self, mapping_fn: Callable):
    self.mapping_fn = mapping_fn

  def build(self, body, axes, out_axes, size, name, donate, layout):
    n_in, n_out = layout.n_leaves, layout.n_out

    def pure(*args, **kwargs):
      *args, state_values = args
      leaves = jax.tree.leaves((tuple(args), kwargs))
      outs = body(*leaves, *state_values)
      return layout.out_tree.unflatten(outs[:n_out]), list(outs[n_out:])

    mapped = self.mapping_fn(pure, in_axes=(*layout.arg_axes, list(axes[n_in:])),
                             out_axes=(layout.out_axes, list(out_axes[n_out:])),
                             axis_name=name, axis_size=size)

    def call(*slots):
      args, kwargs = layout.treedef.unflatten(slots[:n_in])
      out, states = mapped(*args, list(slots[n_in:]), **kwargs)
      return (*jax.tree.leaves(out), *states)
    return call
