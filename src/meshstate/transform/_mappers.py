"""Mappers: how an entry's program is traced (discovery) and run, for vmap, jit and user maps.

A mapper turns `body(*lane_slots) -> out_slots` into one callable over global slots. A *slot* is
one positional value of the program: an argument leaf or a state's value (a pytree). The
layout (`_engine.Layout`) gives each slot its mapped axis, or None. Mappers also trace a probe
abstractly (no compile) for discovery, through the same mapping that will run it. The
`Mesh` + `shard_map` mappers live in `_mesh.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

__all__ = ['Mapper', 'VmapMapper', 'JitMapper', 'CustomMapper', 'constrain', 'vmap_trace']


def _pin(value: Any, sharding: Any) -> Any:
  if sharding is None:
    return value
  explicit = jax.sharding.AxisType.Explicit in tuple(sharding.mesh.axis_types)
  # On Explicit-axis meshes the sharding is part of the type: change it with reshard.
  pin = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
  return pin(value, sharding)


def constrain(outs: Sequence[Any], shardings: Sequence[Any] | None) -> tuple:
  """Pin output slots to the given shardings (None leaves a slot as the compiler lays it out)."""
  if not shardings:
    return tuple(outs)
  return tuple(map(_pin, outs, shardings))


class Mapper:
  """Strategy of a `StatefulMapping`: how to trace (discovery) and run (program) its body."""
  mapped = True        # False for plain jit: no axis, nothing varies, random keys are not split
  keeps_layout = False  # True when written states are pinned to the layout they came in with

  def slot_shardings(self, layout: Any) -> list | None:
    """Where the program wants each input slot; states are placed there once."""
    return None

  def trace(self, probe: Callable, slots: Sequence[Any], layout: Any) -> None:
    raise NotImplementedError

  def build(self, body: Callable, layout: Any, donate: tuple[int, ...]) -> Callable:
    raise NotImplementedError


def _vmap(fn: Callable, layout: Any, out_axes: Any, spmd_axis_name: Any = None) -> Callable:
  return jax.vmap(fn, in_axes=tuple(layout.slot_axes), out_axes=out_axes,
                  axis_name=layout.name, axis_size=layout.size, spmd_axis_name=spmd_axis_name)


def vmap_trace(probe: Callable, slots: Sequence[Any], layout: Any) -> None:
  """Discovery under `jax.vmap`: written values' batching says whether they vary."""
  jax.eval_shape(_vmap(probe, layout, None), *slots)


class VmapMapper(Mapper):
  """`jax.vmap` under one `jax.jit` (the engine of `vmap2`)."""

  def __init__(self, spmd_axis_name: Any = None):
    self.spmd_axis_name = spmd_axis_name

  def trace(self, probe, slots, layout):
    vmap_trace(probe, slots, layout)

  def build(self, body, layout, donate):
    return jax.jit(_vmap(body, layout, tuple(layout.out_slot_axes), self.spmd_axis_name),
                   donate_argnums=donate)


class JitMapper(Mapper):
  """No mapping at all: the engine of the state-aware `jit`."""
  mapped = False
  keeps_layout = True

  def trace(self, probe, slots, layout):
    jax.eval_shape(probe, *slots)

  def build(self, body, layout, donate):
    return jax.jit(lambda *slots: constrain(body(*slots), layout.out_shardings),
                   donate_argnums=donate)

  def keep(self, value: Any, in_axis: None, out_axis: None, layout: Any) -> Any:
    sharding = getattr(value, 'sharding', None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


class CustomMapper(VmapMapper):
  """A user's `mapping_fn`, called like `jax.vmap`/`jax.pmap` on a pure function.

  The pure function takes the user's positional arguments first, in their original positions
  (static ones as None), then the list of state values; keyword arguments pass through.
  Discovery traces with `jax.vmap`, which maps the same way.
  """

  def __init__(self, mapping_fn: Callable):
    self.mapping_fn = mapping_fn

  def build(self, body, layout, donate):
    n_in, n_out = layout.n_leaves, layout.n_out

    def pure(*args, **kwargs):
      *args, state_values = args
      leaves = jax.tree.leaves((tuple(args), kwargs))
      outs = body(*leaves, *state_values)
      return layout.out_tree.unflatten(outs[:n_out]), list(outs[n_out:])

    mapped = self.mapping_fn(pure, in_axes=(*layout.arg_axes, list(layout.slot_axes[n_in:])),
                             out_axes=(layout.out_axes, list(layout.out_slot_axes[n_out:])),
                             axis_name=layout.name, axis_size=layout.size)

    def call(*slots):
      args, kwargs = layout.treedef.unflatten(slots[:n_in])
      out, states = mapped(*args, list(slots[n_in:]), **kwargs)
      return (*jax.tree.leaves(out), *states)
    return call
