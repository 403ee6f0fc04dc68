"""`pmap2` and `vmap2`: `jax.pmap`- and `jax.vmap`-shaped front ends of `StatefulMapping`."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, overload

import jax
from jax.sharding import Mesh

from meshstate.transform._engine import StatefulMapping
from meshstate.transform._mappers import VmapMapper
from meshstate.transform._mesh import MeshMapper

__all__ = ['pmap2', 'vmap2']

Decorator = Callable[[Callable[..., Any]], StatefulMapping]


@overload
def pmap2(fun: Callable[..., Any], axis_name: Any = None, *, in_axes: Any = 0,
          out_axes: Any = 0, static_broadcasted_argnums: int | Sequence[int] = (),
          devices: Sequence[Any] | None = None, backend: str | None = None,
          axis_size: int | None = None, donate_argnums: int | Sequence[int] = (),
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', mesh: Mesh | None = None,
          donate_states: bool = False) -> StatefulMapping: ...
@overload
def pmap2(fun: None = None, axis_name: Any = None, *, in_axes: Any = 0,
          out_axes: Any = 0, static_broadcasted_argnums: int | Sequence[int] = (),
          devices: Sequence[Any] | None = None, backend: str | None = None,
          axis_size: int | None = None, donate_argnums: int | Sequence[int] = (),
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', mesh: Mesh | None = None,
          donate_states: bool = False) -> Decorator: ...


def pmap2(fun: Callable[..., Any] | None = None, axis_name: Any = None, *, in_axes: Any = 0,
          out_axes: Any = 0, static_broadcasted_argnums: int | Sequence[int] = (),
          devices: Sequence[Any] | None = None, backend: str | None = None,
          axis_size: int | None = None, donate_argnums: int | Sequence[int] = (),
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', mesh: Mesh | None = None,
          donate_states: bool = False) -> StatefulMapping | Decorator:
  """Map `fun` over devices like `jax.pmap`, carrying the `State`s it reads and writes.

  Runs as one `jax.jit(jax.shard_map(...))` over a 1-D mesh of the chosen devices; after a
  call every written state holds a `jax.Array` sharded on that mesh. With `mesh=`, maps over
  the axis `axis_name` of that (multi-axis) mesh, and states sharded over its other axes keep
  that layout. `donate_states=True` donates the buffers of states the call rewrites. Without
  `fun`, returns a decorator. Where it differs from `jax.pmap` (and from brainstate's `pmap2`),
  the conformance table in the docs says so.

  Args:
    fun: the function to map. It may read and write `State`s (closed over, module attributes,
      the global random key); they are found while it is traced. A `Module` or a bound method
      of one lets state filters match states by their path in it.
    axis_name: the name of the mapped axis, for collectives (`jax.lax.psum(x, axis_name)`)
      inside `fun`. With `mesh=`, the mesh axis to map over (required then).
    in_axes: which axis of each positional argument to map: an int (negative counts from the
      end), None (broadcast to every device), or a tuple/pytree prefix with one entry per
      positional argument. Keyword arguments are always mapped along axis 0.
    out_axes: where the mapped axis appears in each output (an int, or a pytree prefix of the
      outputs). None returns an output unmapped; that output must then be the same on every
      device (a `ValueError` otherwise, where `jax.pmap` would return device 0's value).
    static_broadcasted_argnums: positional arguments (counted in `fun`'s own positions,
      negative ones from the end) passed to `fun` as Python values, not traced: they must be
      hashable, and a new value compiles a new program.
    devices: the devices to map over, in mesh order; the mapped size must equal their number
      (or be a multiple of it: each device then runs several lanes). Default: all devices (of
      every process), of which the first `size` are used.
    backend: the platform whose devices to use when `devices` is None (`'cpu'`, `'gpu'`,
      `'tpu'`).
    axis_size: the mapped size. Needed when no argument and no declared state is mapped;
      otherwise it must agree with them (a `ValueError` names both).
    donate_argnums: positional arguments (in `fun`'s positions) whose buffers the program may
      reuse for its outputs, as in `jax.pmap`; do not use them after the call.
    state_in_axes: which states `fun` reads per device, and along which axis: `{axis:
      selector}`, or a bare selector meaning `{0: selector}`. A selector is a filter of
      `meshstate.util.filter`, a `State` subclass, a `State`, or an iterable of `State`s; the
      first matching entry wins. States read but not selected are broadcast (every device
      reads the whole value); `RandomState`s are always split, one key per lane.
    state_out_axes: the same form, for states `fun` writes: a selected state is written back
      with the mapped axis at that position (sharded over the devices). A written state not
      selected here is written back unmapped when its new value is the same on every device,
      and otherwise handled by `unexpected_out_state_mapping`.
    unexpected_out_state_mapping: what to do with a state written with a value that differs
      across devices but is not selected by `state_out_axes` (nor read with an axis from
      `state_in_axes`): `'auto'` (default), `'warn'`, `'ignore'` or `'raise'`. See
      `StatefulMapping` for each policy.
    mesh: a `jax.sharding.Mesh` whose axis `axis_name` is the mapped axis; states sharded over
      its other axes keep that layout (model parallelism). Not with `devices`. Without `mesh`
      or `devices`, a call under `jax.set_mesh(m)` maps over `m`'s axis `axis_name`.
    donate_states: donate the buffers of the states the call reads and rewrites, so that the
      new values may reuse their memory; the old values must not be used after the call.

  Returns:
    A `StatefulMapping` (with `explain`, `lower` and the mapping's settings as attributes),
    or, without `fun`, a decorator that makes one.

  Example:
    >>> import jax, jax.numpy as jnp, meshstate
    >>> from meshstate.transform import pmap2
    >>> n = jax.local_device_count()
    >>> total = meshstate.State(jnp.zeros(()))
    >>> @pmap2(axis_name='d')
    ... def step(x):
    ...   total.value = total.value + jax.lax.psum(x, 'd')
    ...   return x * 2
    >>> step(jnp.ones(n)).shape == (n,), float(total.value) == n
    (True, True)
  """
  if fun is None:
    return functools.partial(
        pmap2, axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
        static_broadcasted_argnums=static_broadcasted_argnums, devices=devices, backend=backend,
        axis_size=axis_size, donate_argnums=donate_argnums, state_in_axes=state_in_axes,
        state_out_axes=state_out_axes, unexpected_out_state_mapping=unexpected_out_state_mapping,
        mesh=mesh, donate_states=donate_states)
  if mesh is not None and axis_name is None:
    raise ValueError(f'pmap2(mesh=...) needs axis_name= naming one of the mesh axes '
                     f'{tuple(mesh.axis_names)}.')
  return StatefulMapping(fun, in_axes=in_axes, out_axes=out_axes, state_in_axes=state_in_axes,
                         state_out_axes=state_out_axes,
                         unexpected_out_state_mapping=unexpected_out_state_mapping,
                         axis_size=axis_size, axis_name=axis_name,
                         mapping_fn=MeshMapper(devices, backend, mesh),
                         static_argnums=static_broadcasted_argnums,
                         static_argname='static_broadcasted_argnums',
                         donate_argnums=donate_argnums, donate_states=donate_states)


@overload
def vmap2(fun: Callable[..., Any], in_axes: Any = 0, out_axes: Any = 0, *,
          axis_name: Any = None, axis_size: int | None = None, spmd_axis_name: Any = None,
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', static_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = ()) -> StatefulMapping: ...
@overload
def vmap2(fun: None = None, in_axes: Any = 0, out_axes: Any = 0, *,
          axis_name: Any = None, axis_size: int | None = None, spmd_axis_name: Any = None,
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', static_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = ()) -> Decorator: ...
def vmap2(fun: Callable[..., Any] | None = None, in_axes: Any = 0, out_axes: Any = 0, *,
          axis_name: Any = None, axis_size: int | None = None, spmd_axis_name: Any = None,
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', static_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = ()) -> StatefulMapping | Decorator:
  """Vectorise `fun` like `jax.vmap`, carrying the `State`s it reads and writes.

  Takes `jax.vmap`'s arguments (`spmd_axis_name` included) plus the three state arguments of
  `pmap2`; compiled once per call signature with `jax.jit`. Without `fun`, returns a decorator.

  Args:
    fun: the function to vectorise; it may read and write `State`s.
    in_axes: which axis of each positional argument to map: an int (negative counts from the
      end), None (broadcast), or a tuple/pytree prefix with one entry per positional argument.
      Keyword arguments are always mapped along axis 0.
    out_axes: where the mapped axis appears in each output (an int, None, or a pytree prefix).
      None needs an output that is the same on every lane.
    axis_name: the name of the mapped axis, for collectives inside `fun`.
    axis_size: the mapped size; needed only when nothing mapped gives it.
    spmd_axis_name: a mesh axis (or tuple of axes) that the mapped axis is sharded over, as
      in `jax.vmap` (the mesh is that of the arguments' `NamedSharding`s).
    state_in_axes: which states are read per lane, and along which axis: `{axis: selector}`
      or a bare selector (`{0: selector}`), as in `pmap2`. Others are broadcast.
    state_out_axes: the same form, for written states: a selected state gets the mapped axis
      at that position.
    unexpected_out_state_mapping: the policy for a state written with per-lane values that
      `state_out_axes` does not select: `'auto'`, `'warn'`, `'ignore'` or `'raise'` (see
      `StatefulMapping`).
    static_argnums: positional arguments passed to `fun` as Python values (hashable; a new
      value traces again).
    static_argnames: keyword arguments passed to `fun` as Python values.

  Returns:
    A `StatefulMapping`, or, without `fun`, a decorator that makes one.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> from meshstate.transform import vmap2
    >>> w = meshstate.ParamState(jnp.ones(3))
    >>> vmap2(lambda x: w.value * x)(jnp.arange(2.)).tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
  """
  if fun is None:
    return functools.partial(
        vmap2, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size,
        spmd_axis_name=spmd_axis_name, state_in_axes=state_in_axes,
        state_out_axes=state_out_axes, unexpected_out_state_mapping=unexpected_out_state_mapping,
        static_argnums=static_argnums, static_argnames=static_argnames)
  mapping_fn = jax.vmap if spmd_axis_name is None else VmapMapper(spmd_axis_name)
  return StatefulMapping(fun, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name,
                         axis_size=axis_size, state_in_axes=state_in_axes,
                         state_out_axes=state_out_axes,
                         unexpected_out_state_mapping=unexpected_out_state_mapping,
                         static_argnums=static_argnums, static_argnames=static_argnames,
                         mapping_fn=mapping_fn)
