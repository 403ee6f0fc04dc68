"""The state-aware `meshstate.transform.shard_map` (SPEC section "State-aware shard_map").

Expected values are computed with numpy, block by block, the way `jax.shard_map` hands blocks
to the body: the block of mesh position (d, m) of a value laid out by `P('data', 'model')` is
rows d*R:(d+1)*R and columns m*C:(m+1)*C.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from helpers import mesh_2x4
from meshstate import LongTermState, ParamState, ShortTermState, State
from meshstate.random import RandomState
from meshstate.transform import shard_map
from meshstate.util.filter import OfType, PathContains

D, M = 2, 4   # mesh ('data', 'model')
RNG = np.random.RandomState(7)


@pytest.fixture(params=['Mesh', 'make_mesh'])
def mesh(request):
  return mesh_2x4(request.param)


@pytest.fixture(scope='module')
def auto_mesh():
  return mesh_2x4('Mesh')


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def spec_of(state):
  """The state's spec with trailing Nones dropped (P(None,) and P() both mean replicated)."""
  entries = list(state.value.sharding.spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def no_tracers(*states):
  for s in states:
    assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(s.value))


# -- state specs ----------------------------------------------------------------------------------

def test_one_spec_for_all_states(mesh):
  w0, b0, x = rand(4, 8), rand(2, 4), rand(2, 4)
  w, b = ParamState(jnp.asarray(w0)), ShortTermState(jnp.asarray(b0))
  seen = {}

  def step(xb):
    seen['w'], seen['b'], seen['x'] = w.value.shape, b.value.shape, xb.shape
    w.value = w.value * 2 + xb.sum()
    b.value = b.value - jnp.mean(w.value)
    return xb * jnp.sum(w.value)

  f = shard_map(step, mesh=mesh, in_specs=P('data'), out_specs=P('data', 'model'),
                state_in_specs=P('data', 'model'))
  out = f(jnp.asarray(x))
  assert seen == {'w': (2, 2), 'b': (1, 1), 'x': (1, 4)}

  want_w, want_b, want_out = np.empty_like(w0), np.empty_like(b0), np.empty((2, 16), np.float32)
  for d in range(D):
    for m in range(M):
      wb = w0[2 * d:2 * d + 2, 2 * m:2 * m + 2] * 2 + x[d].sum()
      want_w[2 * d:2 * d + 2, 2 * m:2 * m + 2] = wb
      want_b[d, m] = b0[d, m] - wb.mean()
      want_out[d, 4 * m:4 * m + 4] = x[d] * wb.sum()
  close(out, want_out)
  close(w.value, want_w)
  close(b.value, want_b)
  assert spec_of(w) == P('data', 'model') and spec_of(b) == P('data', 'model')
  assert out.sharding.spec == P('data', 'model')


def test_state_dict_spec_and_uncovered_states_are_replicated(mesh):
  w0, u0, x = rand(3, 8), rand(5), rand(4, 3)
  w, u = ParamState(jnp.asarray(w0)), State(jnp.asarray(u0))
  count = LongTermState(jnp.zeros((), jnp.int32))
  seen = {}

  def step(xb):
    seen['w'], seen['u'] = w.value.shape, u.value.shape
    w.value = w.value + jnp.sum(u.value)
    count.value = count.value + 1
    return xb @ w.value

  f = shard_map(step, mesh=mesh, in_specs=P('data'), out_specs=P('data', 'model'),
                state_in_specs={w: P(None, 'model')})
  out = f(jnp.asarray(x))
  assert seen == {'w': (3, 2), 'u': (5,)}   # u is not covered: the body sees all of it
  new_w = w0 + u0.sum()
  close(w.value, new_w)
  close(out, x @ new_w)
  close(u.value, u0)
  assert int(count.value) == 1
  assert spec_of(w) == P(None, 'model')     # written: keeps its in spec
  assert count.value.sharding.is_fully_replicated


def test_filter_specs_and_state_out_specs(mesh):
  class Block(meshstate.nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = ParamState(jnp.asarray(rand(8)))
      self.trace = ShortTermState(jnp.asarray(rand(2, 3)))
      self.last = ShortTermState(jnp.zeros((3,)))   # write-only below

    def __call__(self, xb):
      self.weight.value = self.weight.value * 3
      self.trace.value = self.trace.value + xb.sum()
      self.last.value = xb[0] * 2
      return xb

  blk = Block()
  w0, t0, x = map(np.asarray, (blk.weight.value, blk.trace.value, rand(2, 3)))
  f = shard_map(blk, mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                state_in_specs={OfType(ParamState): P('model'), PathContains('trace'): P('data')},
                state_out_specs={PathContains('last'): P('data')})
  close(f(jnp.asarray(x)), x)
  close(blk.weight.value, w0 * 3)
  close(blk.trace.value, t0 + x.sum(axis=1, keepdims=True))
  close(blk.last.value, (x * 2).reshape(-1))   # per-'data' blocks of shape (3,), concatenated
  assert spec_of(blk.weight) == P('model')
  assert spec_of(blk.trace) == P('data')
  assert spec_of(blk.last) == P('data')


# -- randomness -----------------------------------------------------------------------------------

def test_default_random_differs_per_shard_and_advances_once(auto_mesh):
  def once():
    return meshstate.random.normal(size=(1,))

  def thrice():
    meshstate.random.normal(size=(1,))
    meshstate.random.normal(size=(1,))
    return meshstate.random.normal(size=(1,))

  spec = dict(mesh=auto_mesh, in_specs=(), out_specs=P(('data', 'model')))
  meshstate.random.seed(3)
  k0 = np.asarray(meshstate.random.DEFAULT.value)
  f = shard_map(once, **spec)
  a = np.asarray(f())
  k1 = np.asarray(meshstate.random.DEFAULT.value)
  assert a.shape == (D * M,) and len(set(a.tolist())) == D * M
  assert not np.array_equal(k0, k1)
  b = np.asarray(f())
  assert not np.array_equal(a, b)   # the next call draws afresh
  meshstate.random.seed(3)
  shard_map(thrice, **spec)()
  # the key advances once per call, however many draws each shard makes
  np.testing.assert_array_equal(np.asarray(meshstate.random.DEFAULT.value), k1)
  meshstate.random.seed(3)
  np.testing.assert_array_equal(np.asarray(f()), a)   # reproducible from the seed


def test_random_state_key_per_shard(mesh):
  rs = RandomState(11)
  k0 = np.asarray(rs.value)

  def draw(xb):
    return xb + jax.random.uniform(rs.split_key(), xb.shape)

  f = shard_map(draw, mesh=mesh, in_specs=P('data', 'model'), out_specs=P('data', 'model'))
  out = np.asarray(f(jnp.zeros((2, 4))))
  assert len(set(out.ravel().tolist())) == D * M
  assert ((out >= 0) & (out < 1)).all()
  assert not np.array_equal(np.asarray(rs.value), k0)
  assert rs.value.shape == k0.shape
  no_tracers(rs)


# -- meshes, caching, atomicity -------------------------------------------------------------------

def _descent_step(w):
  def step(xb):
    y = xb @ w.value
    w.value = w.value - 0.5 * jax.lax.pmean(xb.T @ y, 'data')
    return y
  return step


def test_explicit_and_auto_meshes_agree():
  x, w0 = rand(4, 3), rand(3, 8)
  results = []
  for kind in ('Mesh', 'make_mesh'):
    mesh = mesh_2x4(kind)
    w = ParamState(jnp.asarray(w0))
    f = shard_map(_descent_step(w), mesh=mesh, in_specs=P('data'), out_specs=P('data', 'model'),
                  state_in_specs=P(None, 'model'))
    out = f(jnp.asarray(x))
    assert spec_of(w) == P(None, 'model')
    assert w.value.sharding.mesh.axis_names == ('data', 'model')
    results.append((np.asarray(out), np.asarray(w.value)))
  grads = [x[2 * d:2 * d + 2].T @ (x[2 * d:2 * d + 2] @ w0) for d in range(D)]
  for out, new_w in results:
    close(out, x @ w0)
    close(new_w, w0 - 0.5 * np.mean(grads, axis=0))


def test_repeated_calls_do_not_rerun_the_body(auto_mesh):
  w0, x = rand(4, 8), rand(2, 4)
  w = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(auto_mesh, P('data', 'model'))))
  total = State(jax.device_put(jnp.zeros(()), NamedSharding(auto_mesh, P())))
  runs = []

  def step(xb):
    runs.append(1)
    w.value = w.value + xb.sum()
    total.value = total.value + jax.lax.psum(jnp.sum(xb), 'data')
    return xb

  f = shard_map(step, mesh=auto_mesh, in_specs=P('data'), out_specs=P('data'),
                state_in_specs={w: P('data', 'model')})
  xs = jax.device_put(jnp.asarray(x), NamedSharding(auto_mesh, P('data')))
  f(xs)
  first = len(runs)
  assert 1 <= first <= 2   # discovery (and at most one more trace to build the program)
  for _ in range(4):
    f(xs)
  assert len(runs) == first
  close(w.value, w0 + 5 * np.repeat(x.sum(axis=1), 2)[:, None])
  close(total.value, 5 * x.sum())


def test_a_raising_function_leaves_states_unchanged(auto_mesh):
  w0 = rand(4, 8)
  w, rs = ParamState(jnp.asarray(w0)), RandomState(5)
  meshstate.random.seed(1)
  k_default, k_rs = np.asarray(meshstate.random.DEFAULT.value), np.asarray(rs.value)

  def step(xb):
    w.value = w.value * 0
    meshstate.random.normal(size=(2,))
    rs.split_key()
    if xb.shape[0] == 1:
      raise RuntimeError('boom')
    return xb

  f = shard_map(step, mesh=auto_mesh, in_specs=P('data'), out_specs=P('data'),
                state_in_specs={w: P('data', 'model')})
  with pytest.raises(RuntimeError, match='boom'):
    f(jnp.ones((2, 3)))
  no_tracers(w, rs, meshstate.random.DEFAULT)
  np.testing.assert_array_equal(np.asarray(w.value), w0)
  np.testing.assert_array_equal(np.asarray(rs.value), k_rs)
  np.testing.assert_array_equal(np.asarray(meshstate.random.DEFAULT.value), k_default)
  # the same mapping still works for a signature that does not raise
  f(jnp.ones((4, 3)))
  close(w.value, np.zeros_like(w0))


# -- errors ---------------------------------------------------------------------------------------

def test_error_written_value_varies_over_an_axis_its_spec_omits(auto_mesh):
  s = ParamState(jnp.zeros(8))

  def step(xb):
    s.value = s.value + xb.sum()   # differs across 'data', but s is replicated
    return xb

  f = shard_map(step, mesh=auto_mesh, in_specs=P('data'), out_specs=P('data'))
  with pytest.raises(ValueError) as err:
    f(jnp.ones((2, 3)))
  msg = str(err.value)
  assert 'ParamState' in msg and "'data'" in msg and "'model'" not in msg
  np.testing.assert_array_equal(np.asarray(s.value), np.zeros(8))
  no_tracers(s)


def test_error_state_dim_not_divisible(auto_mesh):
  s = State(jnp.zeros((6, 2)))
  f = shard_map(lambda: s.value.sum(), mesh=auto_mesh, in_specs=(), out_specs=P(),
                state_in_specs=P('model'))
  with pytest.raises(ValueError) as err:
    f()
  msg = str(err.value)
  assert '6' in msg and '4' in msg
  assert np.shape(s.value) == (6, 2)


@pytest.mark.parametrize('where, spec, message', [
    ('state_in_specs', P(None, 'model'),
     r"state_in_specs for ParamState 'w' \(shape \(4, 4\)\): spec P\(None, 'model'\) names "
     r"\['model'\], but this shard_map is manual over \['data'\] only"),
    ('state_out_specs', P(None, 'model'),
     r"state_out_specs for ParamState 'w' .* names \['model'\], but .* over \['data'\] only"),
    ('in_specs', P('model'), r"in_specs for argument\[0\]: spec P\('model',\) names "
                             r"\['model'\], but"),
    ('out_specs', P('model'), r"out_specs for output: spec P\('model',\) names \['model'\], but"),
    ('state_in_specs', P('foo'), r"state_in_specs for ParamState 'w' .* names \['foo'\], which "
                                 r"are not axes of the mesh \{'data': 2, 'model': 4\}"),
])
def test_error_spec_names_an_axis_that_is_not_manual(mesh, where, spec, message):
  # A state's spec naming such an axis failed deep in the trace (NameError: unbound axis
  # name), or with JAX's message about the program's flat inputs, or with a bare KeyError.
  w = ParamState(jnp.ones((4, 4)), name='w')
  specs = dict(in_specs=P('data'), out_specs=P('data'), state_in_specs={w: P()},
               state_out_specs={w: P()})
  specs[where] = {w: spec} if where.startswith('state') else spec

  def step(x):
    w.value = w.value + 1
    return x

  f = shard_map(step, mesh=mesh, axis_names={'data'}, **specs)
  with pytest.raises(ValueError, match=message):
    f(jnp.ones((4, 4)))
  np.testing.assert_array_equal(np.asarray(w.value), np.ones((4, 4)))
  no_tracers(w)


def test_error_keyword_arguments(auto_mesh):
  f = shard_map(lambda x: x, mesh=auto_mesh, in_specs=P('data'), out_specs=P('data'))
  with pytest.raises(TypeError):
    f(x=jnp.ones((2, 3)))


def test_error_bad_state_spec_types(auto_mesh):
  with pytest.raises(TypeError):
    shard_map(lambda: None, mesh=auto_mesh, in_specs=(), out_specs=(), state_in_specs=[P()])
  s = State(jnp.zeros(4))
  with pytest.raises(TypeError):
    shard_map(lambda: None, mesh=auto_mesh, in_specs=(), out_specs=(),
              state_in_specs={s: 'model'})


def test_static_argnums(auto_mesh):
  f = shard_map(lambda x, n: x * n, mesh=auto_mesh, in_specs=(P('data'), None),
                out_specs=P('data'), static_argnums=(1,))
  x = rand(2, 3)
  close(f(jnp.asarray(x), 3), x * 3)
