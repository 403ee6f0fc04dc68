"""The state-aware `shard_map`: explicit `PartitionSpec`s for arguments, outputs and states."""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshstate._state import State
from meshstate.random import RandomState
from meshstate.transform import _axes
from meshstate.transform._engine import Layout, StatefulMapping
from meshstate.transform._lift import Reader
from meshstate.transform._mesh import SpecMapper, block_shape, spec_axes
from meshstate.transform._discover import explicitly_typed, lane_key, placeholder, vary, vma_of
from meshstate.util.filter import Everything, to_predicate

__all__ = ['shard_map', 'StatefulShardMap']


def _state_specs(specs: Any, argname: str) -> list[tuple[P, Callable]]:
  """One spec, `{State: spec}` or `{filter: spec}` → `[(spec, predicate)]`, first match wins."""
  if specs is None:
    return []
  if isinstance(specs, P):
    return [(specs, Everything())]
  if not isinstance(specs, dict):
    raise TypeError(f'{argname} must be a PartitionSpec, a {{State: spec}} or a '
                    f'{{filter: spec}} dict, got {type(specs).__name__}.')
  out = []
  for selector, spec in specs.items():
    if not isinstance(spec, P):
      raise TypeError(f'{argname}: the spec for {selector!r} must be a PartitionSpec, '
                      f'got {spec!r}.')
    out.append((spec, to_predicate(selector)))
  return out


def _is_spec(x: Any) -> bool:
  return x is None or isinstance(x, P)


class StatefulShardMap(StatefulMapping):
  """`jax.shard_map` that also carries the `State`s the function reads and writes.

  The body sees per-device blocks, as under `jax.shard_map`. States are laid out by
  `state_in_specs`/`state_out_specs`; a state they do not cover is replicated when read, and a
  rewritten state keeps the spec it was read with. Made by `shard_map`, whose arguments these
  are.

  Args:
    fun: the per-device function.
    mesh: the mesh, or None for the context mesh of each call.
    in_specs: a `PartitionSpec` per positional argument (or one for all).
    out_specs: a `PartitionSpec`, or a pytree prefix of the outputs made of them.
    state_in_specs: one spec, a `{State: spec}` or a `{filter: spec}` dict, for states read.
    state_out_specs: the same form, for states written.
    static_argnums: positional arguments passed as Python values.
    donate_argnums: positional arguments whose buffers may be reused.
    donate_states: donate the buffers of the states the call reads and rewrites.
    check_vma: `jax.shard_map`'s varying-manual-axes check.
    axis_names: the mesh axes `fun` is manual over (None: all).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, meshstate
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()), ('i',))
    >>> f = meshstate.transform.StatefulShardMap(lambda x: x * 2, mesh, P('i'), P('i'))
    >>> f(jnp.ones(len(jax.devices()))).sum() == 2 * len(jax.devices())
    Array(True, dtype=bool)
  """
  _sized = False

  def __init__(self, fun: Callable, mesh: Mesh | None, in_specs: Any, out_specs: Any,
               state_in_specs: Any = None, state_out_specs: Any = None,
               static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
               donate_states: bool = False, check_vma: bool = True, axis_names: Any = None):
    if mesh is not None and not isinstance(mesh, Mesh):
      raise TypeError(f'shard_map needs a jax.sharding.Mesh, got {type(mesh).__name__}.')
    if out_specs is None:
      raise TypeError('shard_map needs out_specs (a PartitionSpec, or a pytree of them matching '
                      'the outputs).')
    mapper = SpecMapper(mesh, axis_names=axis_names, check_vma=check_vma)
    super().__init__(fun, in_axes=in_specs, out_axes=out_specs, mapping_fn=mapper,
                     axis_name=None if mesh is None else tuple(mesh.axis_names),
                     static_argnums=static_argnums, donate_argnums=donate_argnums,
                     donate_states=donate_states)
    self.check_vma = check_vma
    self.in_specs, self.out_specs = in_specs, out_specs
    self.state_in_specs = _state_specs(state_in_specs, 'state_in_specs')
    self.state_out_specs = _state_specs(state_out_specs, 'state_out_specs')

  def _specs(self, prefix: Any, tree: Any, argname: str, what: str) -> list[P]:
    # None in a spec prefix means replicated; None in `tree` (a static argument) has no leaves.
    prefix = jax.tree.map(lambda s: P() if s is None else s, prefix, is_leaf=_is_spec)
    try:
      full = jax.tree.broadcast(prefix, tree, is_leaf=lambda s: isinstance(s, P))
    except ValueError as err:
      raise ValueError(f'{argname}={prefix!r} is not a prefix of the {what} structure '
                       f'{jax.tree.structure(tree)}: {err}') from None
    return jax.tree.leaves(full, is_leaf=lambda s: isinstance(s, P))

  @property
  def mesh(self) -> Mesh:
    """The mesh it maps over: the one given, else the context mesh of the current call."""
    return self._mapper.user_mesh

  def _layout_args(self, treedef, leaves, args, kwargs, paths) -> Layout:
    if kwargs:
      raise TypeError(f'shard_map takes positional arguments only; got keyword arguments '
                      f'{sorted(kwargs)}.')
    in_specs = self.in_specs
    if in_specs is None:
      raise TypeError('shard_map needs in_specs (a PartitionSpec, or a pytree of them matching '
                      'the arguments).')
    prefix = (tuple(in_specs) if isinstance(in_specs, list) else in_specs, {})
    mesh = self.mesh
    manual = self._mapper.manual(mesh)
    name = tuple(a for a in mesh.axis_names if a in manual)
    specs = self._specs(prefix, (args, kwargs), 'in_specs', 'argument')
    for (path, _), spec in zip(jax.tree_util.tree_flatten_with_path((args, kwargs))[0], specs):
      self._check_axes(spec, f'in_specs for argument{jax.tree_util.keystr(path[1:])}')
    return Layout(name, None, treedef, len(leaves), (), [], slot_axes=specs)

  def _check_axes(self, spec: P, what: str) -> P:
    """`spec`, once every axis it names is a manual axis of the mesh (else a ValueError)."""
    named, mesh = set(spec_axes(spec)), self.mesh
    manual = self._mapper.manual(mesh)
    if named <= manual:
      return spec
    unknown = named - set(mesh.axis_names)
    if unknown:
      raise ValueError(f'{what}: spec {spec} names {sorted(unknown)}, which are not axes of the '
                       f'mesh {dict(mesh.shape)}.')
    raise ValueError(f'{what}: spec {spec} names {sorted(named - manual)}, but this shard_map '
                     f'is manual over {sorted(manual)} only (axis_names): a spec names only '
                     f'those; add the others to axis_names to split over them.')

  def _layout_state_in(self, state: State, paths: dict, fed: dict) -> P:
    spec = self._first(self.state_in_specs, state, paths) or P()
    return self._check_axes(spec, f'state_in_specs for {self._describe(state, paths)}')

  def _view(self, state, base, layout, paths, fed, reader):
    typed = self._mapper.check_vma   # the view is typed by shard_map: slots typed like it
    if isinstance(state, RandomState):
      # Typed: the key enters replicated, typed by the body's mesh (not an enclosing trace's).
      key = (base if reader is None else reader.read_like(state, placeholder(base)) if typed
             else reader.read(state, base))
      return lane_key(key, layout.name)[1]
    spec = self._layout_state_in(state, paths, fed)
    block = functools.partial(self._block_shape, spec=spec, state=state, paths=paths)
    if reader is not None and not typed:   # typed as laid out by its spec first (`_placed`)
      return reader.read(state, self._placed_like(base, spec), block, frozenset(spec_axes(spec)))
    view = jax.tree.map(lambda x: _first_block(self._typed_placeholder(x, spec, reader), block,
                                               spec_axes(spec), typed), base)
    return view if reader is None else reader.read_like(state, view)

  def _typed_placeholder(self, x: Any, spec: P, reader: Reader | None) -> Any:
    """A stand-in of leaf `x` typed, in the shard_map body, by the layout a call keeps over the
    non-manual Explicit axes (`SpecMapper.keep_spec`); when such an axis splits a dimension
    that `spec` splits too, the view is untyped and the program is traced again."""
    stand_in = placeholder(x)
    kept = self._mapper.keep_spec(x, P()) if explicitly_typed(x) else None
    if kept is None or not spec_axes(kept.spec):
      return stand_in
    if any(e is not None and i < len(spec) and spec[i] is not None
           for i, e in enumerate(kept.spec)):
      if reader is not None:
        reader.usable = False
      return stand_in
    return lax.full(jnp.shape(x), 0, jnp.result_type(x),
                    sharding=NamedSharding(jax.sharding.get_abstract_mesh(), kept.spec))

  def _placed_like(self, base: Any, spec: P) -> Any:
    """`base`'s arrays as abstract values laid out on the mesh by `spec` over the manual axes
    (and as they are over the others), as a call places them."""
    sharding = NamedSharding(self.mesh, spec)

    def placed(x):
      if not isinstance(x, jax.Array):
        return x
      aval = jax.typeof(x)
      return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type,
                                  sharding=self._mapper.place(x, sharding))
    return jax.tree.map(placed, base)

  def _lane_of(self, x: Any, axis: Any) -> tuple | None:
    # One device's block (a random state's key has no spec: it is whole on every device).
    return block_shape(jnp.shape(x), axis, self.mesh) if isinstance(axis, P) else jnp.shape(x)

  def _block_shape(self, shape: tuple, spec: P, state: State, paths: dict) -> tuple:
    """The shape of one device's block of a global `shape` laid out by `spec`."""
    if len(spec) > len(shape):
      raise ValueError(f'state_in_specs for {self._describe(state, paths)}: spec {spec} has '
                       f'{len(spec)} entries for a value of rank {len(shape)}.')
    for dim, entry in enumerate(spec):
      k = math.prod(self.mesh.shape[a] for a in _axes.entry_axes(entry))
      if shape[dim] % k:
        raise ValueError(f'state_in_specs for {self._describe(state, paths)}: dimension {dim} '
                         f'has size {shape[dim]}, not divisible by the {k} devices of mesh '
                         f'axes {entry!r}.')
    return block_shape(shape, spec, self.mesh)

  def _own(self, vma: frozenset) -> frozenset:
    # Axes an enclosing body is manual over are not this one's to name in a spec: a value
    # varying over them leaves this body as it came in (JAX's nested shard_map does the same).
    return vma & self._mapper.manual(self.mesh)

  def _layout_outputs(self, disc, layout):
    out_avals = disc.out_tree.unflatten(disc.out_avals)
    specs = self._specs(self.out_specs, out_avals, 'out_specs', 'output')
    flat = jax.tree_util.tree_flatten_with_path(out_avals)[0]
    for (path, _), spec, vma in zip(flat, specs, disc.out_vma):
      self._check_axes(spec, f'out_specs for output{jax.tree_util.keystr(path)}')
      missing = self._own(vma) - set(spec_axes(spec))
      if missing:
        raise ValueError(f'out_specs gives output{jax.tree_util.keystr(path)} the spec {spec}, '
                         f'but its value differs across mesh axes {sorted(missing)}; name them '
                         f'in the spec or reduce over them (e.g. jax.lax.psum).')
    return specs

  def _layout_state_out(self, state, disc, in_spec, paths):
    spec = self._first(self.state_out_specs, state, paths) or in_spec or P()
    self._check_axes(spec, f'state_out_specs for {self._describe(state, paths)}')
    missing = self._own(disc.write_vma[state]) - set(spec_axes(spec))
    if missing:
      raise ValueError(f'{self._describe(state, paths)} is written with a value that differs '
                       f'across mesh axes {sorted(missing)}, but its out spec is {spec}; give it '
                       f'a spec naming them in state_out_specs, or reduce over them.')
    return spec


def _first_block(x: Any, block: Callable[[tuple], tuple], axes: tuple, typed: bool) -> Any:
  """Device 0's block of a global value, varying over `axes` like it: by its type (`typed`,
  under `check_vma`), else as the traced jaxpr shows (`vary`)."""
  x = lax.slice(x, (0,) * jax.numpy.ndim(x), block(jax.numpy.shape(x)))
  if typed:
    missing = tuple(a for a in axes if a not in vma_of(x))
    return lax.pcast(x, missing, to='varying') if missing else x
  return vary(x, axes) if axes else x


Decorator = Callable[[Callable[..., Any]], StatefulShardMap]


@overload
def shard_map(fun: Callable[..., Any], mesh: Mesh | None = None, in_specs: Any = None,
              out_specs: Any = None, *, state_in_specs: Any = None, state_out_specs: Any = None,
              check_vma: bool = True, axis_names: Any = None,
              static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
              donate_states: bool = False) -> StatefulShardMap: ...
@overload
def shard_map(fun: None = None, mesh: Mesh | None = None, in_specs: Any = None,
              out_specs: Any = None, *, state_in_specs: Any = None, state_out_specs: Any = None,
              check_vma: bool = True, axis_names: Any = None,
              static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
              donate_states: bool = False) -> Decorator: ...
def shard_map(fun: Callable[..., Any] | None = None, mesh: Mesh | None = None,
              in_specs: Any = None, out_specs: Any = None, *, state_in_specs: Any = None,
              state_out_specs: Any = None, check_vma: bool = True, axis_names: Any = None,
              static_argnums: int | Sequence[int] = (), donate_argnums: int | Sequence[int] = (),
              donate_states: bool = False) -> StatefulShardMap | Decorator:
  """`jax.shard_map` under `jax.jit` that reads and writes `State`s with explicit specs.

  `mesh`, `in_specs` and `out_specs` may be passed positionally (as in brainstate) or by
  keyword (as in `jax.shard_map`); without `mesh`, each call uses the context mesh
  (`jax.sharding.set_mesh`). `axis_names` makes only those mesh axes manual (the others stay
  automatic), and `check_vma` is `jax.shard_map`'s. `state_in_specs`/`state_out_specs` are one
  `PartitionSpec` for every state, a `{State: spec}` dict or a `{filter: spec}` dict; uncovered
  states are replicated when read and keep their spec when rewritten. Random states get a
  distinct key per device.

  Args:
    fun: the per-device function; it sees blocks of the arguments and of the states, as
      under `jax.shard_map`, and may read and write `State`s.
    mesh: the `jax.sharding.Mesh` to run on; None uses the context mesh of each call.
    in_specs: a `PartitionSpec` per positional argument (a tuple with one entry per argument,
      or one spec for all); None in it means replicated. Keyword arguments are not accepted
      at call time.
    out_specs: a `PartitionSpec`, or a pytree prefix of the outputs made of them. An output
      that differs across a mesh axis must name that axis (checked, a `ValueError` otherwise).
    state_in_specs: how states are laid out when read: one `PartitionSpec` for every state, a
      `{State: spec}` dict or a `{filter: spec}` dict (first match wins). Uncovered states are
      replicated.
    state_out_specs: the same form, for written states; a written state not covered keeps the
      spec it was read with (replicated if it was not read).
    check_vma: `jax.shard_map`'s varying-manual-axes check: True types each value by the mesh
      axes it varies over (and differentiates accordingly); False gives `jax.pmap`'s semantics.
    axis_names: the mesh axes `fun` is manual over (a set of names); the other axes stay
      automatic, as in `jax.shard_map`. None: all of them.
    static_argnums: positional arguments passed to `fun` as Python values (hashable; a new
      value compiles a new program).
    donate_argnums: positional arguments whose buffers the program may reuse for its outputs.
    donate_states: donate the buffers of the states the call reads and rewrites.

  Returns:
    A `StatefulShardMap` (a `StatefulMapping`: with `explain` and `lower`), or, without
    `fun`, a decorator that makes one.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, meshstate
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()), ('i',))
    >>> n = len(jax.devices())
    >>> w = meshstate.ParamState(jnp.zeros((n, 2)))
    >>> @meshstate.transform.shard_map(mesh=mesh, in_specs=P('i'), out_specs=P('i'),
    ...                                state_in_specs={w: P('i')})
    ... def step(x):
    ...   w.value = w.value + x
    ...   return x * 2
    >>> step(jnp.ones((n, 2))).shape == (n, 2), w.spec
    (True, P('i',))
  """
  kwargs = dict(mesh=mesh, in_specs=in_specs, out_specs=out_specs, state_in_specs=state_in_specs,
                state_out_specs=state_out_specs, static_argnums=static_argnums,
                donate_argnums=donate_argnums, donate_states=donate_states,
                check_vma=check_vma, axis_names=axis_names)
  if fun is None:
    return functools.partial(shard_map, **kwargs)
  return StatefulShardMap(fun, mesh, in_specs, out_specs, state_in_specs=state_in_specs,
                          state_out_specs=state_out_specs, static_argnums=static_argnums,
                          donate_argnums=donate_argnums, donate_states=donate_states,
                          check_vma=check_vma, axis_names=axis_names)
