"""Small helpers shared by the test modules."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from meshstate.transform import pmap2, shard_map

N = jax.device_count()
_RNG = np.random.RandomState(0)


def rand(*shape):
  """A float32 array of standard normals (fresh numbers on every call)."""
  return jnp.asarray(_RNG.standard_normal(shape).astype(np.float32))


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def no_tracer(*states):
  for s in states:
    for leaf in jax.tree.leaves(s.value):
      assert not isinstance(leaf, jax.core.Tracer), f'{s!r} holds a tracer'


def mesh_2x4(kind: str) -> Mesh:
  """A ('data', 'model') mesh of 2 x 4 devices: Auto axes ('Mesh') or Explicit ('make_mesh')."""
  if kind == 'Mesh':
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))
  return jax.make_mesh((2, 4), ('data', 'model'))


def nested_step(outer_kind: str, inner_kind: str, mesh: Mesh, count, *, outer_check=True,
                inner_check=True):
  """A step over mesh axis 'data' (the outer mapping, 'pmap2' or 'shard_map') that calls one
  over 'model' (the inner), as JAX's own shard_map nests. The inner one finds the outer one's
  mesh, adds the sum of its input over both axes to the State `count`, and returns
  `v * 2 + (model index) + 10 * (data index)`; the outer one adds 1. Returns the step, taking
  and returning arrays of shape (devices, ...), and the bodies' trace counts (a Counter)."""
  traces = collections.Counter()

  def inner(v):
    traces['inner'] += 1
    count.value = count.value + lax.psum(lax.psum(v.sum(), 'model'), 'data')
    return v * 2 + lax.axis_index('model') + 10 * lax.axis_index('data')

  if inner_kind == 'pmap2':
    g = pmap2(inner, axis_name='model')
  else:   # no mesh=: the enclosing body's
    g = shard_map(inner, in_specs=P('model'), out_specs=P('model'), axis_names={'model'},
                  check_vma=inner_check)

  def outer(block):
    traces['outer'] += 1
    return g(block) + 1

  if outer_kind == 'pmap2':
    f = pmap2(outer, axis_name='data', mesh=mesh)
    lanes = mesh.shape['data'], mesh.shape['model']
    return (lambda x: f(x.reshape(*lanes, *x.shape[1:])).reshape(x.shape)), traces
  return shard_map(outer, mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                   axis_names={'data'}, check_vma=outer_check), traces


def nested_want(x):
  """What `nested_step` returns for x on a 2 x 4 ('data', 'model') mesh."""
  d, m = np.divmod(np.arange(len(x)), 4)
  return np.asarray(x) * 2 + (m + 10 * d).reshape(-1, *[1] * (np.ndim(x) - 1)) + 1
