"""The default engine of `pmap2`: a `jax.sharding.Mesh` and `jax.shard_map` under `jax.jit`."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh

from meshstate.transform._axes import spec_at
from meshstate.transform._mappers import Mapper

__all__ = ['MeshMapper', 'mesh_1d']


@functools.lru_cache(maxsize=None)
def mesh_1d(devices: tuple, name: str) -> Mesh:
  """The 1-D mesh named `name` over `devices`, built once per device tuple."""
  return Mesh(np.array(devices, dtype=object), (name,))


def _squeeze(slots: Sequence[Any], axes: Sequence[int | None]) -> list[Any]:
  return [v if a is None else jax.tree.map(lambda x, a=a: lax.squeeze(x, (a,)), v)
          for v, a in zip(slots, axes)]


def _expand(slots: Sequence[Any], axes: Sequence[int | None]) -> tuple[Any, ...]:
  return tuple(v if a is None else jax.tree.map(lambda x, a=a: lax.expand_dims(x, (a,)), v)
               for v, a in zip(slots, axes))


class MeshMapper(Mapper):
  """`jax.shard_map` over a 1-D `Mesh` under one `jax.jit` (the engine of `pmap2`).

  The mapped dimension of each slot is split over the mesh axis; inside, each device holds a
  block of size one that is squeezed away, so the body sees what `jax.pmap` would show it.
  """

  def __init__(self, devices: Sequence[Any] | None = None, backend: str | None = None):
    self.devices = None if devices is None else tuple(devices)
    self.backend = backend

  def mesh(self, size: int, name: str) -> Mesh:
    if self.devices is not None:
      devices = self.devices
      if len(devices) != size:
        raise ValueError(f'pmap2 was given devices= with {len(devices)} devices, but the mapped '
                         f'axis has size {size}; they must be equal.')
    else:
      devices = tuple(jax.local_devices(backend=self.backend))
      if size > len(devices):
        raise ValueError(f'The mapped axis has size {size}, more than the {len(devices)} '
                         f'available devices; pass at most {len(devices)} lanes to pmap2 '
                         f'(or use vmap2).')
      devices = devices[:size]
    return mesh_1d(devices, name)

  def _shard_map(self, fn, axes, out_axes, size, name):
    return jax.shard_map(fn, mesh=self.mesh(size, name),
                         in_specs=tuple(spec_at(a, name) for a in axes),
                         out_specs=out_axes if out_axes == () else
                         tuple(spec_at(a, name) for a in out_axes),
                         check_vma=True)

  def trace(self, probe, slots, axes, size, name):
    def squeezed(*slots):
      probe(*_squeeze(slots, axes))
      return ()
    jax.eval_shape(self._shard_map(squeezed, axes, (), size, name), *slots)

  def build(self, body, axes, out_axes, size, name, donate, layout):
    def squeezed(*slots):
      return _expand(body(*_squeeze(slots, axes)), out_axes)
    return jax.jit(self._shard_map(squeezed, axes, out_axes, size, name), donate_argnums=donate)
