"""The `Mesh` + `jax.shard_map` engines: `pmap2`'s axis mapper and the state-aware `shard_map`'s.

`MeshMapper` splits each slot's mapped dimension over one mesh axis and squeezes it away inside,
so the body sees what `jax.pmap` would show it. Its mesh is a 1-D mesh over the chosen devices,
a user's multi-axis mesh, or — for a `pmap2` called inside another — the enclosing call's mesh,
which grows an axis for the inner map. `SpecMapper` hands explicit `PartitionSpec`s to
`shard_map` and shows the body per-device blocks, as `jax.shard_map` does.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import lax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from meshstate import _compat
from meshstate.transform._axes import entry_axes, spec_at, spec_entries
from meshstate.transform._mappers import Mapper, constrain, plan_of, trace_mapped, vmapped
from meshstate.transform._discover import Traced, explicitly_typed, lane_aval, trace_lanes
from meshstate.transform._lift import never_blocks
from meshstate.transform._multihost import global_devices

__all__ = ['MeshMapper', 'SpecMapper', 'NeedAxis', 'mesh_1d', 'current_mesh', 'context_key',
           'typed_elsewhere', 'spec_axes', 'block_shape']


@functools.lru_cache(maxsize=None)
def mesh_1d(devices: tuple, names: tuple, shape: tuple) -> Mesh:
  """The mesh named `names` of `shape` over `devices`, built once per device tuple."""
  return Mesh(np.array(devices, dtype=object).reshape(shape), names)


class _Context(threading.local):
  def __init__(self):
    # (mesh, discovering, manual axes) of each enclosing pmap2/shard_map body being traced,
    # innermost last.
    self.stack: list[tuple[Mesh, bool, frozenset]] = []


_context = _Context()


def current_mesh() -> Mesh | None:
  """The mesh of the innermost meshstate `shard_map` body being traced, if any."""
  return _context.stack[-1][0] if _context.stack else None


def not_in_a_raw_body(what: str) -> None:
  """Raise unless the calling mapping is outside every `shard_map` body or inside a meshstate
  one: in a body of JAX's own (`jax.shard_map`, `jax.pmap`) meshstate has no mesh to map on."""
  if _context.stack:
    return
  manual = list(jax.sharding.get_abstract_mesh().manual_axes)
  if manual:
    raise ValueError(f'{what} was called inside the body of JAX\'s own shard_map (or pmap), '
                     f'which is manual over mesh axes {manual}; meshstate maps inside its own '
                     f'bodies only. Make the enclosing one meshstate.transform.shard_map (it '
                     f'takes the same arguments), or call {what} outside it.')


def context_key() -> tuple | None:
  """Identifies the enclosing body a nested call is traced in (programs differ per context)."""
  return (id(_context.stack[-1][0]), _context.stack[-1][1]) if _context.stack else None


@contextlib.contextmanager
def _inside(mesh: Mesh, discovering: bool = False, manual: frozenset = frozenset()):
  _context.stack.append((mesh, discovering, manual))
  try:
    yield
  finally:
    _context.stack.pop()


def _body_mesh(mesh: Mesh, manual: frozenset):
  """The abstract mesh a `shard_map` body over the `manual` axes of `mesh` is traced under.

  Discovery traces on lane values outside shard_map; tracing it under this mesh records, in
  each equation, the context the program evaluates it in when the trace is lifted to the
  program (collectives on a partly manual mesh lower against the other axes). On an
  Explicit-axis mesh the lanes are typed by the axes that stay Explicit in the body
  (`lane_sharding`), as the program's are.
  """
  base = jax.sharding.get_abstract_mesh()   # nested in a body on `mesh`: its axes stay manual
  if AxisType.Manual not in base.axis_types or (
      (base.axis_names, base.axis_sizes) != (mesh.axis_names, mesh.axis_sizes)):
    base = mesh.abstract_mesh
  manual_mesh = base.update_axis_types({a: AxisType.Manual for a in manual})
  return jax.sharding.use_abstract_mesh(manual_mesh)


class NeedAxis(Exception):
  """Raised by a `pmap2` traced inside another whose mesh lacks its axis: the outer adds it."""

  def __init__(self, name: str, size: int, asker: 'MeshMapper'):
    super().__init__(f'nested pmap2 needs mesh axis {name!r} of size {size}')
    self.name, self.size, self.asker = name, size, asker


def _squeeze(slots: Sequence[Any], axes: Sequence[int | None]) -> list[Any]:
  return [v if a is None else jax.tree.map(lambda x, a=a: lax.squeeze(x, (a,)), v)
          for v, a in zip(slots, axes)]


def _expand(slots: Sequence[Any], axes: Sequence[int | None]) -> tuple[Any, ...]:
  return tuple(v if a is None else jax.tree.map(lambda x, a=a: lax.expand_dims(x, (a,)), v)
               for v, a in zip(slots, axes))


def _fit(x: Any, spec: P, manual: frozenset, mesh: Any) -> Any:
  """`x` resharded so its manual-axis layout is `spec`, its other axes as they were.

  shard_map does not reshard inputs on Explicit-axis meshes; this does it first.
  """
  current = jax.typeof(x).sharding.spec
  want = merge_spec(current, spec, manual, jnp.ndim(x))
  if list(want) == spec_entries(current, jnp.ndim(x)):
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, want))


def merge_spec(now: P, spec: P, manual: frozenset, ndim: int) -> P:
  """`spec` over the `manual` axes, and `now`'s other axes where they were (rank `ndim`)."""
  want = []
  for dim, entry in enumerate(spec_entries(now, ndim)):
    kept = tuple(a for a in entry_axes(entry) if a not in manual)
    new = kept + (entry_axes(spec[dim]) if dim < len(spec) else ())
    want.append(None if not new else new[0] if len(new) == 1 else new)
  return P(*want)


def typed_elsewhere(x: Any, mesh: Any) -> bool:
  """Whether `x`'s type carries the sharding of an Explicit-axis mesh other than `mesh`.

  Laid out over the same devices or not, such a value cannot enter a program on `mesh`.
  """
  if not explicitly_typed(x):
    return False
  own = jax.typeof(x).sharding.mesh   # an AbstractMesh
  # (Nested in a body on `mesh`, a value of that body is typed by its partly manual mesh.)
  return own != getattr(mesh, 'abstract_mesh', mesh) and not (
      current_mesh() is mesh and own == jax.sharding.get_abstract_mesh())


class _ShardMapMapper(Mapper):
  """What both mesh engines share: programs are `jit(shard_map(block_fn))` on a mesh."""
  check_vma = True

  def mesh_and_specs(self, layout) -> tuple[Mesh, frozenset, tuple, tuple]:
    """`(mesh, manual axes, in_specs, out_specs)` for `layout`."""
    raise NotImplementedError

  def block_fn(self, body: Callable, layout) -> Callable:
    """`body` (which sees lanes) as a function of the per-device blocks shard_map passes."""
    raise NotImplementedError

  def _inside_fn(self, fn, layout, mesh):
    block = self.block_fn(fn, layout)

    manual = self.mesh_and_specs(layout)[1]

    def inside(*slots):
      with _inside(mesh, manual=manual):
        return block(*slots)
    return inside

  def _shard_map(self, block, mesh, manual, in_specs, out_specs):
    """`(shard_map of block, fit)`: `fit` reshards inputs first on Explicit meshes, else None."""
    # Inside an enclosing meshstate shard_map, JAX wants the context's (partly manual) mesh.
    on = jax.sharding.get_abstract_mesh() if current_mesh() is mesh else mesh
    mapped = jax.shard_map(block, mesh=on, in_specs=in_specs, out_specs=out_specs,
                           axis_names=manual, check_vma=self.check_vma)
    if AxisType.Explicit not in tuple(mesh.axis_types):
      return mapped, None

    def fit(*slots):
      return tuple(jax.tree.map(lambda x, s=s: _fit(x, s, manual, on), v)
                   for v, s in zip(slots, in_specs))
    return mapped, fit

  def trace_blocks(self, probe, slots, layout) -> Traced:
    """Discovery under `shard_map(check_vma=True)`: its varying-axes typing says what varies.

    The probe is traced to a jaxpr of its own inside the shard_map body, on the typed blocks,
    so that the program can be that jaxpr.
    """
    mesh, manual, in_specs, _ = self.mesh_and_specs(layout)
    found = []

    def returns_nothing(*lanes):
      found.append(jax.make_jaxpr(probe)(*lanes))
      return ()
    mapped, fit = self._shard_map(self._inside_fn(returns_nothing, layout, mesh), mesh, manual,
                                  in_specs, ())
    # A value typed by another Explicit mesh is moved onto this one before each call.
    slots = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
             if typed_elsewhere(x, mesh) else x for x, spec in zip(slots, in_specs)]
    jax.eval_shape(mapped, *(fit(*slots) if fit else slots))
    return Traced(found[0], [], frozenset(), typed=True)

  def plan(self, body, layout, donate):
    mesh, manual, in_specs, out_specs = self.mesh_and_specs(layout)
    block = self._inside_fn(body, layout, mesh)
    mapped, fit = self._shard_map(block, mesh, manual, in_specs, out_specs)
    outs = tuple(layout.out_shardings)
    ins = self.jit_in_shardings(layout)
    if fit is None:
      fn = jax.jit(lambda *slots: constrain(mapped(*slots), outs), donate_argnums=donate,
                   in_shardings=ins)
    else:
      fn = jax.jit(lambda *slots: constrain(mapped(*fit(*slots)), outs), donate_argnums=donate)
    return plan_of(layout, 'shard_map', fn, block, donate, mesh=mesh, manual=manual,
                   in_specs=in_specs, out_specs=out_specs, check_vma=self.check_vma,
                   in_shardings=() if ins is None else ins, out_shardings=outs, fit=fit)

  def jit_in_shardings(self, layout) -> tuple | None:
    """Shardings `jit` moves the inputs to first (None: take them as they come)."""
    return None


class MeshMapper(_ShardMapMapper):
  """`jax.shard_map` over one mesh axis under one `jax.jit` (the engine of `pmap2`).

  It keeps `jax.pmap`'s semantics, which are those of `shard_map(check_vma=False)`: an unmapped
  value is a per-device copy, so `jax.grad` with respect to it is per device (not summed over
  devices, as under `check_vma=True`). Whether a written value differs across devices is read
  from the traced program (`_varying.py`).
  """
  check_vma = False

  def __init__(self, devices: Sequence[Any] | None = None, backend: str | None = None,
               mesh: Mesh | None = None):
    if mesh is not None and devices is not None:
      raise ValueError('pmap2 takes devices= or mesh=, not both.')
    if devices is not None:
      devices = tuple(devices)
      if not devices:
        raise ValueError('pmap2 was given devices=[]: pass at least one device, or leave '
                         'devices=None to use all of them.')
      if len(set(devices)) != len(devices):
        repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
        raise ValueError(f'pmap2 was given devices= with repeated devices {repeated}; each '
                         f'device may appear once.')
    self.devices = devices
    self.backend = backend
    self.user_mesh = mesh
    self.keeps_layout = mesh is not None
    self._inner: dict[str, int] = {}   # axes that nested pmap2 calls asked for

  def lanes_per_device(self, layout) -> int:
    """How many lanes each device runs: 1, or size / devices when there are more lanes."""
    if self._inner or current_mesh() is not None:
      return 1
    count, size = self._axis_devices(layout.name), layout.size
    return size // count if 0 < count < size and size % count == 0 else 1

  def _axis_devices(self, name) -> int:
    """How many devices the mapped axis can spread over."""
    if self.user_mesh is not None:
      return self.user_mesh.shape.get(name, 0)
    if self.devices is not None:
      return len(self.devices)
    return len(global_devices(self.backend))

  def on_mesh(self, mesh: Mesh) -> 'MeshMapper':
    """This mapper with `mesh=mesh`."""
    return MeshMapper(None, self.backend, mesh)

  def context_mesh(self) -> Mesh | None:
    # Without mesh= or devices=, and not nested in another body, a pmap2 called under
    # `jax.set_mesh` maps over an axis of that mesh (its own would clash with it in JAX).
    if self.user_mesh is not None or self.devices is not None or _context.stack:
      return None
    return _compat.context_mesh()

  def spans_processes(self) -> bool:
    """Whether this pmap2 maps over the devices of several processes, each passing its part."""
    return (self.user_mesh is None and self.devices is None and current_mesh() is None
            and jax.process_count(self.backend) > 1)

  def trace(self, probe, slots, layout):
    # A pmap2 called in the body finds this mesh in the context and asks for its axis.
    # Discovery is traced under the abstract mesh the program runs under: a shard_map body's,
    # or with more lanes than devices the whole mesh, which the program's vmap batches over.
    mesh, manual = self.mesh(layout.size, layout.name), frozenset({layout.name})
    # (Nested in another body, `lanes_per_device` is 1: `_body_mesh` keeps that body's axes.)
    context = (_body_mesh(mesh, manual) if self.lanes_per_device(layout) == 1 else
               jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    with _inside(mesh, True, manual), context:
      return trace_mapped(probe, slots, layout)

  def plan(self, body, layout, donate):
    if self.lanes_per_device(layout) == 1:
      return super().plan(body, layout, donate)
    # More lanes than devices: vmap over all lanes, the lane axis split over the devices.
    mesh = self.mesh(layout.size, layout.name)
    ins, outs = self._lane_shardings(mesh, layout)
    mapped = vmapped(body, layout, spmd_axis_name=layout.name)

    def program(*slots):
      # jax.vmap batches the values it makes (axis_index, a lane's key) over the mesh it
      # finds in the context: without one, an Explicit axis is "not found in mesh: ()".
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return constrain(mapped(*constrain(slots, ins)), outs)
    fn = jax.jit(program, donate_argnums=donate)
    return plan_of(layout, 'vmap', fn, body, donate, mesh=mesh, in_shardings=ins,
                   out_shardings=outs, spmd_axis_name=layout.name)

  def _lane_shardings(self, mesh: Mesh, layout) -> tuple[tuple, tuple]:
    """Where a vmap over more lanes than devices takes and leaves each slot: the lane axis
    split over the devices, and a rewritten state on the layout it keeps (`Layout.out_shardings`)
    over the mesh's other axes."""
    ins = self.slot_shardings(layout)
    kept = layout.out_shardings or [None] * len(layout.out_slot_axes)
    outs = [NamedSharding(mesh, spec_at(a, layout.name)) if k is None else k
            for k, a in zip(kept, layout.out_slot_axes)]
    n_in, n_out = layout.n_leaves, layout.n_out
    for j, state in enumerate(layout.out_states):
      if kept[n_out + j] is not None and state in layout.in_states:
        i = n_in + layout.in_states.index(state)
        if layout.slot_axes[i] == layout.out_slot_axes[n_out + j]:
          ins[i] = outs[n_out + j]
    return tuple(ins), tuple(outs)

  def unliftable(self, layout, args=()):
    # A state keeps its layout over the other axes (`_placed` leaves them), and `fit` reshards
    # only the mapped axis: discovery's lanes, typed by the values as they come
    # (`lane_sharding`), are typed like the program's, under the program's mesh (`trace`).
    return never_blocks

  def slot_shardings(self, layout) -> list:
    mesh = self.mesh(layout.size, layout.name)
    return [NamedSharding(mesh, spec_at(a, layout.name)) for a in layout.slot_axes]

  def jit_in_shardings(self, layout) -> tuple | None:
    # On a mesh of our own, inputs laid out over the same devices in another order are moved.
    if self.user_mesh is not None or current_mesh() is not None:
      return None
    return tuple(self.slot_shardings(layout))

  def add_axis(self, need: NeedAxis) -> None:
    if need.name in self._inner:
      raise ValueError(f'Nested pmap2 calls disagree on the size of axis {need.name!r}: '
                       f'{self._inner[need.name]} and {need.size}.')
    self._inner[need.name] = need.size

  def mesh(self, size: int, name: str) -> Mesh:
    not_in_a_raw_body('pmap2')
    if any(name in manual for *_, manual in _context.stack):
      raise ValueError(f'Nested pmap2 calls both use axis_name {name!r}: the inner one would map '
                       f'over the axis the outer one already maps. Give the inner pmap2 another '
                       f'axis_name (collectives over {name!r} inside it still reach the outer '
                       f'axis).')
    mesh = self.user_mesh
    if mesh is None and current_mesh() is not None and self.devices is None:
      mesh = current_mesh()
      if name not in mesh.axis_names:  # pyright: ignore[reportOptionalMemberAccess]
        raise NeedAxis(name, size, self)
    if mesh is not None:
      if name not in mesh.axis_names:
        raise ValueError(f'axis_name {name!r} is not an axis of the mesh, whose axes are '
                         f'{dict(mesh.shape)}.')
      k = mesh.shape[name]
      if size != k and (mesh is not self.user_mesh or size < k or size % k):
        raise ValueError(f'The mapped axis has size {size}, but mesh axis {name!r} has size '
                         f'{k} (mesh {dict(mesh.shape)}); map {k} lanes, or a multiple of {k} '
                         f'(each device then runs several).')
      return mesh
    shape = (size, *self._inner.values())
    need = math.prod(shape)
    if self.devices is not None:
      devices = self.devices
      if need > len(devices) and not self._inner and need % len(devices) == 0:
        return mesh_1d(devices, (name,), (len(devices),))   # several lanes per device
      if len(devices) != need:
        raise ValueError(f'pmap2 was given devices= with {len(devices)} devices, but the mapped '
                         f'axis has size {size}{self._inner_text()}; it must be {len(devices)} '
                         f'or a multiple of it.')
    else:
      devices = global_devices(self.backend)   # the local ones when there is one process
      if need > len(devices) and not self._inner and need % len(devices) == 0:
        return mesh_1d(devices, (name,), (len(devices),))   # several lanes per device
      if need > len(devices):
        raise ValueError(f'The mapped axis has size {size}{self._inner_text()}, which needs '
                         f'{need} devices, but only {len(devices)} are available; pass at most '
                         f'{len(devices)} lanes, or a multiple of {len(devices)} (each device '
                         f'then runs several), or use vmap2.')
      devices = devices[:need]
    return mesh_1d(devices, (name, *self._inner), shape)

  def _inner_text(self) -> str:
    return ''.join(f' x {s} (nested axis {n!r})' for n, s in self._inner.items())

  def mesh_and_specs(self, layout):
    name = layout.name
    return (self.mesh(layout.size, name), frozenset({name}),
            tuple(spec_at(a, name) for a in layout.slot_axes),
            tuple(spec_at(a, name) for a in layout.out_slot_axes))

  def block_fn(self, body, layout):
    def block(*slots):
      return _expand(body(*_squeeze(slots, layout.slot_axes)), layout.out_slot_axes)
    return block

  def keep(self, value: Any, in_axis: int | None, out_axis: int | None, layout) -> Any:
    """The sharding that keeps a written state's layout over the mesh's other axes."""
    sharding = getattr(value, 'sharding', None)
    if not isinstance(sharding, NamedSharding) or sharding.mesh != self.mesh(layout.size,
                                                                              layout.name):
      return None
    entries = spec_entries(sharding.spec, value.ndim)
    if in_axis is not None:
      del entries[in_axis]
    entries = [None if e == layout.name else e for e in entries]
    if out_axis is not None:
      entries.insert(out_axis, layout.name)
    return NamedSharding(sharding.mesh, P(*entries))


class SpecMapper(_ShardMapMapper):
  """`jax.shard_map` with explicit `PartitionSpec`s per slot over the `manual` mesh axes.

  Without a mesh it uses the context mesh (`jax.sharding.set_mesh`) of each call.
  """

  def __init__(self, mesh: Mesh | None, axis_names: Any = None, check_vma: bool = True):
    self._mesh = mesh
    self.follows_context = mesh is None
    self._axis_names = None if axis_names is None else frozenset(axis_names)
    self.check_vma = check_vma
    # Over some of the mesh's axes, a state keeps its layout over the others, as an argument
    # of JAX's shard_map does: specs name the manual axes only.
    self.keeps_layout = self._axis_names is not None and (
        mesh is None or self._axis_names != frozenset(mesh.axis_names))

  @property
  def user_mesh(self) -> Mesh:
    not_in_a_raw_body('shard_map')
    if self._mesh is not None:
      return self._mesh
    # Nested in a meshstate mapping's body, that body's mesh is the context mesh (as JAX's
    # shard_map nested in another finds it); else `jax.set_mesh`'s, also while a jit traces.
    mesh = current_mesh() or _compat.context_mesh()
    if not isinstance(mesh, Mesh) or not mesh.axis_names:
      raise ValueError('shard_map was given no mesh= and there is no context mesh; pass mesh=, '
                       'or call it under `with jax.sharding.set_mesh(mesh):`.')
    return mesh

  def manual(self, mesh: Mesh) -> frozenset:
    if self._axis_names is None:
      return frozenset(mesh.axis_names)
    unknown = self._axis_names - set(mesh.axis_names)
    if unknown:
      raise ValueError(f'shard_map axis_names={sorted(self._axis_names)} names {sorted(unknown)}, '
                       f'which are not axes of the mesh {dict(mesh.shape)}.')
    return self._axis_names

  def unliftable(self, layout, args=()):
    # A call lays each state out by its spec over the manual axes, keeping its other axes
    # (`_placed`), as an argument keeps them; a nested call takes an enclosing trace's values,
    # which its `fit` lays out so too. Discovery's views are typed so (`_placed_like`, typed
    # placeholders).
    return never_blocks

  def place(self, x, sharding):
    return self.keep_spec(x, sharding.spec) or sharding

  def keep(self, value, in_spec, out_spec, layout):
    """The sharding that keeps a written state's layout over the mesh's non-manual axes."""
    return self.keep_spec(value, P() if out_spec is None else out_spec)

  def keep_spec(self, x: Any, spec: P) -> NamedSharding | None:
    """`spec` over the manual axes, `x`'s layout over the others (None: `x` is not on the
    mesh, or this shard_map is manual over every axis). An enclosing trace's value is where
    its type says, when that is this (Explicit) mesh."""
    if not self.keeps_layout:
      return None
    mesh = self.user_mesh
    if isinstance(x, jax.core.Tracer):  # pyright: ignore[reportAttributeAccessIssue]
      now = jax.typeof(x).sharding if explicitly_typed(x) else None
      if now is None or now.mesh != mesh.abstract_mesh:
        return None
    else:
      now = getattr(x, 'sharding', None)
      if not isinstance(now, NamedSharding) or now.mesh != mesh:
        return None
    return NamedSharding(mesh, merge_spec(now.spec, spec, self.manual(mesh), jnp.ndim(x)))

  def slot_shardings(self, layout) -> list:
    mesh, _, specs, _ = self.mesh_and_specs(layout)
    return [NamedSharding(mesh, s) for s in specs]

  def mesh_and_specs(self, layout):
    mesh = self.user_mesh
    specs = lambda layouts: tuple(P() if s is None else s for s in layouts)  # noqa: E731
    return mesh, self.manual(mesh), specs(layout.slot_axes), specs(layout.out_slot_axes)

  def block_fn(self, body, layout):
    return body

  def trace(self, probe, slots, layout):
    if self.check_vma:
      return self.trace_blocks(probe, slots, layout)
    mesh, manual, in_specs, _ = self.mesh_and_specs(layout)
    in_axes = [frozenset(spec_axes(spec)) for spec in in_specs]
    with _inside(mesh, True, manual), _body_mesh(mesh, manual):   # lanes typed as in the body
      avals = [lane_aval(x, block_shape(jax.typeof(x).shape, spec, mesh))
               for x, spec in zip(slots, in_specs)]
      return trace_lanes(probe, avals, in_axes, [(a, mesh.shape[a]) for a in sorted(manual)])


def spec_axes(spec: P) -> tuple:
  """The mesh axes a spec names, in order."""
  return tuple(a for entry in spec for a in entry_axes(entry))


def block_shape(shape: tuple, spec: P, mesh: Mesh) -> tuple:
  """The shape of one device's block of a global `shape` laid out by `spec`."""
  return tuple(n // math.prod(mesh.shape[a] for a in entry_axes(spec[d])) if d < len(spec) else n
               for d, n in enumerate(shape))
