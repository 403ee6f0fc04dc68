"""Small helpers shared by the test modules."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

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
