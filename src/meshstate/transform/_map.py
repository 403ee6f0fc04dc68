"""`pmap2` and `vmap2`: `jax.pmap`- and `jax.vmap`-shaped front ends of `StatefulMapping`."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh

from meshstate.transform._engine import StatefulMapping
from meshstate.transform._mappers import VmapMapper
from meshstate.transform._mesh import MeshMapper

__all__ = ['pmap2', 'vmap2']


def pmap2(fun: Callable | None = None, axis_name: Any = None, *, in_axes: Any = 0,
          out_axes: Any = 0, static_broadcasted_argnums: int | Sequence[int] = (),
          devices: Sequence[Any] | None = None, backend: str | None = None,
          axis_size: int | None = None, donate_argnums: int | Sequence[int] = (),
          state_in_axes: Any = None, state_out_axes: Any = None,
          unexpected_out_state_mapping: str = 'auto', mesh: Mesh | None = None,
          donate_states: bool = False) -> StatefulMapping | Callable:
  """Map `fun` over devices like `jax.pmap`, carrying the `State`s it reads and writes.

  Runs as one `jax.jit(jax.shard_map(...))` over a 1-D mesh of the chosen devices; after a
  call every written state holds a `jax.Array` sharded on that mesh. With `mesh=`, maps over
  the axis `axis_name` of that (multi-axis) mesh, and states sharded over its other axes keep
  that layout. `donate_states=True` donates the buffers of states the call rewrites. Without
  `fun`, returns a decorator.

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
  kwargs = dict(axis_name=axis_name, in_axes=in_axes, out_axes=out_axes,
                static_broadcasted_argnums=static_broadcasted_argnums, devices=devices,
                backend=backend, axis_size=axis_size, donate_argnums=donate_argnums,
                state_in_axes=state_in_axes, state_out_axes=state_out_axes,
                unexpected_out_state_mapping=unexpected_out_state_mapping, mesh=mesh,
                donate_states=donate_states)
  if fun is None:
    return functools.partial(pmap2, **kwargs)
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


def vmap2(fun: Callable | None = None, in_axes: Any = 0, out_axes: Any = 0, *,
          axis_name: Any = None, axis_size: int | None = None, spmd_axis_name: Any = None,
          state_in_axes: Any = None,
          state_out_axes: Any = None, unexpected_out_state_mapping: str = 'auto',
          static_argnums: int | Sequence[int] = (),
          static_argnames: str | Sequence[str] = ()) -> StatefulMapping | Callable:
  """Vectorise `fun` like `jax.vmap`, carrying the `State`s it reads and writes.

  Takes `jax.vmap`'s arguments (`spmd_axis_name` included) plus the three state arguments of
  `pmap2`; compiled once per call signature with `jax.jit`.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> from meshstate.transform import vmap2
    >>> w = meshstate.ParamState(jnp.ones(3))
    >>> vmap2(lambda x: w.value * x)(jnp.arange(2.)).tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
  """
  kwargs = dict(in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size,
                state_in_axes=state_in_axes, state_out_axes=state_out_axes,
                unexpected_out_state_mapping=unexpected_out_state_mapping,
                static_argnums=static_argnums, static_argnames=static_argnames)
  if fun is None:
    return functools.partial(vmap2, spmd_axis_name=spmd_axis_name, **kwargs)
  mapping_fn = jax.vmap if spmd_axis_name is None else VmapMapper(spmd_axis_name)
  return StatefulMapping(fun, mapping_fn=mapping_fn, **kwargs)
