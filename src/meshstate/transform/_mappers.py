"""Mappers: how an entry's program is traced (discovery) and planned, for vmap, jit and user maps.

A mapper turns `body(*lane_slots) -> out_slots` into a `Plan` whose program runs over global
slots. A *slot* is one positional value of the program: an argument leaf or a state's value (a
pytree). The layout (`_engine.Layout`) gives each slot its mapped axis, or None. Mappers also
trace a probe abstractly (no compile) for discovery, on the values one lane sees. The
`Mesh` + `shard_map` mappers live in `_mesh.py`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from meshstate._compat import ArrayImpl
from meshstate.transform._axes import spec_at, spec_entries
from meshstate.transform._discover import Traced, explicitly_typed, lane_aval, trace_lanes
from meshstate.transform._lift import never_blocks
from meshstate.transform._plan import Plan

__all__ = ['Mapper', 'NeedMesh', 'VmapMapper', 'JitMapper', 'CustomMapper', 'constrain',
           'on_typed_mesh', 'trace_mapped']


def _pin(value: Any, sharding: Any) -> Any:
  if sharding is None:
    return value
  if isinstance(sharding, list):   # a pytree state's, leaf by leaf
    leaves, tree = jax.tree.flatten(value)
    return tree.unflatten(list(map(_pin, leaves, sharding)))
  explicit = jax.sharding.AxisType.Explicit in tuple(sharding.mesh.axis_types)
  # On Explicit-axis meshes the sharding is part of the type: change it with reshard.
  pin = jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint
  return pin(value, sharding)


def constrain(outs: Sequence[Any], shardings: Sequence[Any] | None) -> tuple:
  """Pin output slots to the given shardings (None leaves a slot as the compiler lays it out;
  a list gives a pytree slot's leaves theirs)."""
  if not shardings:
    return tuple(outs)
  return tuple(map(_pin, outs, shardings))


def _drop(shape: tuple, axis: int | None) -> tuple:
  return shape if axis is None else shape[:axis] + shape[axis + 1:]


def trace_mapped(probe: Callable, slots: Sequence[Any], layout: Any) -> Traced:
  """Discovery for one mapped axis: trace on one lane's values with the axis bound."""
  avals = [lane_aval(x, _drop(jax.typeof(x).shape, a), a) for x, a in zip(slots, layout.slot_axes)]
  in_axes = [frozenset() if a is None else frozenset({layout.name}) for a in layout.slot_axes]
  return trace_lanes(probe, avals, in_axes, [(layout.name, layout.size)])


class Mapper:
  """Strategy of a `StatefulMapping`: how to trace (discovery) and plan (program) its body."""
  mapped = True        # False for plain jit: no axis, nothing varies, random keys are not split
  keeps_layout = False  # True when written states are pinned to the layout they came in with
  follows_context = False   # True when the mesh is the context mesh of each call
  check_vma = False   # True when the body runs under shard_map's varying-axes typing
  # Declared for the type checker only: the mesh mappers (`_mesh.py`) have these, and the
  # engine reaches them where it knows the kind of mapper, or after a `hasattr` check.
  user_mesh: Any
  fresh: Callable[[], Mapper]
  on_mesh: Callable[[Any], Mapper]
  add_axis: Callable[[Any], None]
  keep: Callable[..., Any]
  keep_spec: Callable[[Any, Any], Any]
  manual: Callable[[Any], frozenset]

  def slot_shardings(self, layout: Any) -> list | None:
    """Where the program wants each input slot; states are placed there once."""
    return None

  def typed_batch(self, slots: Sequence[Any], slot_axes: Sequence[Any]) -> tuple | None:
    """`Layout.batch` when no mapped argument is laid out on a mesh, from the slots' values."""
    return None

  def spans_processes(self) -> bool:
    """Whether each process passes only its part of the inputs (`pmap2` on several hosts)."""
    return False

  def context_mesh(self) -> Any:
    """The context mesh (`jax.set_mesh`) this call maps over instead of its own, or None."""
    return None

  def trace(self, probe: Callable, slots: Sequence[Any], layout: Any) -> Traced | None:
    """Trace `probe` abstractly; return its jaxpr (None: traced without one to keep)."""
    return trace_mapped(probe, slots, layout)

  def unliftable(self, layout: Any, args: Sequence[Any] = ()) -> Callable[[Any], bool] | None:
    """What keeps the discovery jaxpr from being the program (`_lift.py`): a test of each
    state value read, or None when nothing of this call (its argument leaves `args`) can be
    lifted.

    Discovery traces untyped lanes, so by default a value typed by an Explicit-axis mesh
    (whose sharding is part of its type in the program) keeps it from lifting.
    """
    return None if any(map(explicitly_typed, args)) else explicitly_typed

  def place(self, x: Any, sharding: Any) -> Any:
    """Where a call moves leaf `x` of a state whose slot is laid out by `sharding` (`_placed`):
    there, or where it is when it is on that mesh and this mapper keeps layouts."""
    now = getattr(x, 'sharding', None)
    if self.keeps_layout and isinstance(now, jax.sharding.NamedSharding) and (
        now.mesh == sharding.mesh):
      return now
    return sharding

  def plan(self, body: Callable, layout: Any, donate: tuple[int, ...]) -> Plan:
    raise NotImplementedError


def plan_of(layout: Any, kind: str, fn: Callable, block_fn: Callable, donate: tuple,
            **extra: Any) -> Plan:
  """The frozen `Plan` of a finished layout."""
  return Plan(kind=kind, fn=fn, block_fn=block_fn, axis_name=layout.name, size=layout.size,
              treedef=layout.treedef, n_leaves=layout.n_leaves,
              in_states=tuple(layout.in_states), out_states=tuple(layout.out_states),
              static_reads=tuple(layout.static_reads.items()),
              static_writes=tuple(layout.static_writes.items()),
              in_layouts=tuple(layout.slot_axes), out_layouts=tuple(layout.out_slot_axes),
              out_tree=layout.out_tree, n_out=layout.n_out, donate=tuple(donate), **extra)


def vmapped(fn: Callable, layout: Any, spmd_axis_name: Any = None) -> Callable:
  return jax.vmap(fn, in_axes=tuple(layout.slot_axes), out_axes=tuple(layout.out_slot_axes),
                  axis_name=layout.name, axis_size=layout.size, spmd_axis_name=spmd_axis_name)


class NeedMesh(Exception):
  """Raised by `vmap2`'s discovery, traced under no mesh, at the first read of a state typed
  by an Explicit mesh: `value` is that state's leaf."""

  def __init__(self, value: Any):
    super().__init__('discovery needs the mesh of a state it read')
    self.value = value


class VmapMapper(Mapper):
  """`jax.vmap` under one `jax.jit` (the engine of `vmap2`).

  The program is traced under the mesh of its Explicit-typed slots (`on_typed_mesh`), and
  discovery under that of the typed arguments, or else of the states `state_in_axes` names
  (`Layout.named`), or else of the first state read that is typed by one (`NeedMesh`):
  discovery types each lane as the program's (`lane_aval`), and a program lifts unless a state
  it reads is typed by a mesh discovery was not traced under.
  """

  def __init__(self, spmd_axis_name: Any = None):
    self.spmd_axis_name = spmd_axis_name

  def trace(self, probe, slots, layout):
    with typed_mesh([*slots, *layout.named]):
      return trace_mapped(probe, slots, layout)

  def unliftable(self, layout, args=()):
    # What vmap batches under the program's mesh (a lane's key, a random draw's own jitted
    # function) needs that mesh in discovery's trace too. Traced under none, the first read
    # of a state typed by one stops discovery, which runs again under that mesh (the one the
    # program, under its first typed slot's mesh, runs under).
    mesh = typed_mesh_of([*args, *layout.named])

    def blocks(x):
      if not explicitly_typed(x):
        return False
      if mesh is None and not isinstance(x, jax.core.Tracer):  # pyright: ignore
        raise NeedMesh(x)
      return jax.typeof(x).sharding.mesh != mesh
    return blocks

  def typed_batch(self, slots, slot_axes):
    # A batch on no mesh runs under the mesh of the first Explicit-typed slot (`on_typed_mesh`),
    # its lanes split as the first such mapped one's: the layout states are placed in then.
    typed = [(x, a) for slot, a in zip(slots, slot_axes) for x in jax.tree.leaves(slot)
             if type(x) is ArrayImpl and explicitly_typed(x)]
    if not typed:
      return None
    mesh = typed[0][0].sharding.mesh
    mapped = [(x, a) for x, a in typed if a is not None and x.sharding.mesh == mesh]
    if not mapped:
      return mesh, None
    x, axis = mapped[0]
    return mesh, spec_entries(x.sharding.spec, x.ndim)[axis]

  def slot_shardings(self, layout):
    # With a batch laid out on a mesh, a state goes there first, laid out as the program leaves
    # it (`plan` pins it): else its second call would compile again for where the first put it.
    # (On several processes each passes its whole states: they stay as they are.)
    if layout.batch is None or not NamedSharding(layout.batch[0], P()).is_fully_addressable:
      return None
    mesh, axes = layout.batch
    return [NamedSharding(mesh, spec_at(a, axes)) for a in layout.slot_axes]

  def place(self, x, sharding):
    # A state already on a mesh stays as it is laid out (a model-sharded weight, say).
    now = getattr(x, 'sharding', None)
    return now if isinstance(now, NamedSharding) else sharding

  def plan(self, body, layout, donate):
    mapped = on_typed_mesh(vmapped(body, layout, self.spmd_axis_name), layout.slot_axes)
    outs = ()
    if layout.batch is not None:
      outs = (None,) * layout.n_out + tuple(
          self._pin(s, a, layout) for s, a in zip(layout.out_states,
                                                  layout.out_slot_axes[layout.n_out:]))
    fn = jax.jit(lambda *slots: constrain(mapped(*slots), outs), donate_argnums=donate)
    return plan_of(layout, 'vmap', fn, body, donate, spmd_axis_name=self.spmd_axis_name,
                   out_shardings=outs)

  @staticmethod
  def _pin(state: Any, axis: int | None, layout: Any) -> Any:
    """Where the program leaves a rewritten state: where the call placed it (`slot_shardings`),
    if it is there now; None (where the compiler puts it) for a state laid out otherwise."""
    mesh, axes = layout.batch
    pin = NamedSharding(mesh, spec_at(axis, axes))
    leaves = jax.tree.leaves(state._value) if state in layout.in_states else [None]
    return pin if all(_laid_out(x, pin) for x in leaves) else None


def _laid_out(x: Any, sharding: NamedSharding) -> bool:
  """Whether `x` is an array on `sharding`'s mesh, laid out as it says."""
  now = getattr(x, 'sharding', None)
  return (isinstance(now, NamedSharding) and now.mesh == sharding.mesh
          and now.is_equivalent_to(sharding, x.ndim))


def on_typed_mesh(fn: Callable, slot_axes: Sequence[int | None]) -> Callable:
  """`fn`, a `vmap` over `slot_axes`, traced under the abstract mesh of its Explicit-typed
  slots when no mesh is set, its mapped slots laid out alike along the mapped dimension.

  A value `vmap` makes itself (`axis_index`, a lane's random key) is batched over the
  arguments' sharded axis, and JAX finds that axis only in the context mesh: without one,
  `jax.vmap` fails with "Resource axis ... not found in mesh: ()". And `vmap` refuses mapped
  inputs laid out differently there ("should be sharded the same"): a state made on no mesh
  follows the batch.
  """
  def traced(*slots):
    with typed_mesh(slots):
      return fn(*_aligned(slots, slot_axes))
  return traced


def _aligned(slots: Sequence[Any], slot_axes: Sequence[int | None]) -> list:
  """`slots`, each mapped leaf resharded, where it differs, to split its mapped dimension as
  the first Explicit-typed mapped leaf does (values on no mesh replicated otherwise)."""
  mapped = [(i, x, a) for i, (slot, a) in enumerate(zip(slots, slot_axes)) if a is not None
            for x in jax.tree.leaves(slot)]
  typed = [(jax.typeof(x).sharding, a) for _, x, a in mapped if explicitly_typed(x)]
  if not typed:
    return list(slots)
  mesh, entry = typed[0][0].mesh, spec_entries(typed[0][0].spec, typed[0][1] + 1)[typed[0][1]]

  def align(x, axis):
    sharding = jax.typeof(x).sharding
    own = sharding.mesh.axis_names and sharding.mesh == mesh
    entries = spec_entries(sharding.spec if own else P(), jax.numpy.ndim(x))
    if entries[axis] == entry:
      return x
    entries = [None if e == entry else e for e in entries]
    entries[axis] = entry
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, P(*entries)))

  out = list(slots)
  for i in {i for i, _, _ in mapped}:
    out[i] = jax.tree.map(lambda x, a=slot_axes[i]: align(x, a), slots[i])
  return out


def typed_mesh_of(slots: Sequence[Any]) -> Any:
  """The abstract mesh `typed_mesh(slots)` traces under: the context's if one is set, else
  that of the first Explicit-typed value in `slots`, else None."""
  context = jax.sharding.get_abstract_mesh()
  if context.axis_names:
    return context
  typed = [x for x in jax.tree.leaves(slots) if explicitly_typed(x)]
  return jax.typeof(typed[0]).sharding.mesh if typed else None


def typed_mesh(slots: Sequence[Any]):
  """Context: the abstract mesh of the first Explicit-typed value in `slots`, if no mesh is set."""
  mesh = typed_mesh_of(slots)
  if mesh is None or jax.sharding.get_abstract_mesh().axis_names:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


class JitMapper(Mapper):
  """No mapping at all: the engine of the state-aware `jit`.

  Its body sees every value whole, so discovery traces the values' own types (an Explicit
  mesh's shardings included) and any program lifts.
  """
  mapped = False
  keeps_layout = True

  def trace(self, probe, slots, layout):
    avals = [jax.typeof(x) if explicitly_typed(x) else lane_aval(x, jax.typeof(x).shape)
             for x in slots]
    return trace_lanes(probe, avals, [frozenset()] * len(slots), [])

  def unliftable(self, layout, args=()):
    return never_blocks

  def plan(self, body, layout, donate):
    fn = jax.jit(lambda *slots: constrain(body(*slots), layout.out_shardings),
                 donate_argnums=donate)
    return plan_of(layout, 'jit', fn, body, donate, out_shardings=tuple(layout.out_shardings))

  def keep(self, value: Any, in_axis: None, out_axis: None, layout: Any) -> Any:
    sharding = getattr(value, 'sharding', None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


class CustomMapper(Mapper):
  """A user's `mapping_fn`, called like `jax.vmap`/`jax.pmap` on a pure function.

  The pure function takes the user's positional arguments first, in their original positions
  (static ones as None), then the list of state values; keyword arguments pass through.
  """

  def __init__(self, mapping_fn: Callable):
    self.mapping_fn = mapping_fn

  def plan(self, body, layout, donate):
    n_in, n_out = layout.n_leaves, layout.n_out

    def pure(*args, **kwargs):
      *args, state_values = args
      leaves = jax.tree.leaves((tuple(args), kwargs))
      outs = body(*leaves, *state_values)
      return layout.out_tree.unflatten(outs[:n_out]), list(outs[n_out:])

    mapped = self.mapping_fn(pure, in_axes=(*layout.arg_axes, list(layout.slot_axes[n_in:])),
                             out_axes=(layout.out_axes, list(layout.out_slot_axes[n_out:])),
                             axis_name=layout.name, axis_size=layout.size)
    if not callable(mapped):
      raise TypeError(f'mapping_fn returned {mapped!r}, not a function: it is '
                      f'called like jax.vmap(f, in_axes=..., out_axes=..., axis_name=..., '
                      f'axis_size=...) and must return the mapped function.')

    def call(*slots):
      args, kwargs = layout.treedef.unflatten(slots[:n_in])
      out, states = mapped(*args, list(slots[n_in:]), **kwargs)  # pyright: ignore
      return (*jax.tree.leaves(out), *states)
    return plan_of(layout, 'custom', call, body, donate)
