"""Stateless `pmap2` (and `vmap2`) against `jax.vmap` with the same axes and axis name.

Every expected value here is computed by `jax.vmap` (or numpy) from the same inputs; the
tests only assert that meshstate's mesh engine agrees with it, and that the results are laid
out on the mesh the way the SPEC says (the mesh axis at the out axis).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meshstate.transform import StatefulMapping, pmap2, vmap2

N = jax.device_count()
RNG = np.random.RandomState(0)


def rand(*shape):
  return jnp.asarray(RNG.standard_normal(shape).astype(np.float32))


def assert_tree_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert jnp.shape(a) == jnp.shape(e)
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


def check(fn, args, kwargs=None, *, in_axes=0, out_axes=0, axis_size=None):
  kwargs = kwargs or {}
  got = pmap2(fn, axis_name='i', in_axes=in_axes, out_axes=out_axes, axis_size=axis_size)(
      *args, **kwargs)
  want = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, axis_name='i', axis_size=axis_size)(
      *args, **kwargs)
  assert_tree_close(got, want)
  return got


def test_sanity_eight_devices():
  assert N == 8, 'tests/conftest.py must set up 8 simulated CPU devices'


# --- in_axes ----------------------------------------------------------------------------------

def _two(x, y):
  return x * 2.0 + jnp.sum(y)


@pytest.mark.parametrize('in_axes, shapes', [
    (0, [(N, 3), (N, 2)]),
    (1, [(3, N), (2, N)]),
    (-1, [(3, N), (2, N)]),
    (-2, [(N, 3), (N, 2)]),
    ((0, None), [(N, 3), (2,)]),
    ((None, 1), [(3,), (2, N, 4)]),
    ((-1, 0), [(2, 3, N), (N,)]),
], ids=['0', '1', 'neg1', 'neg2', 'tuple_none', 'none_first', 'tuple_neg'])
def test_in_axes(in_axes, shapes):
  check(_two, [rand(*s) for s in shapes], in_axes=in_axes)


def test_in_axes_list_is_tuple():
  check(_two, [rand(N, 3), rand(2)], in_axes=[0, None])


def _dict_body(d, z):
  return {'s': d['a'] * d['b'].sum() + z, 't': d['b']}


@pytest.mark.parametrize('in_axes, shapes, out_axes', [
    (({'a': 0, 'b': None}, 0), ((N, 3), (2,), (N, 3)), {'s': 0, 't': None}),
    (({'a': 1, 'b': 0}, None), ((3, N), (N, 2), (3,)), 0),
    (0, ((N, 3), (N, 2), (N, 3)), 0),
    ((0, -1), ((N, 3), (N, 2), (3, N)), ({'s': -1, 't': 0})),
], ids=['dict_none', 'dict_axis1', 'int', 'dict_int_neg'])
def test_in_axes_pytree_prefix(in_axes, shapes, out_axes):
  a, b, z = (rand(*s) for s in shapes)
  check(_dict_body, [{'a': a, 'b': b}, z], in_axes=in_axes, out_axes=out_axes)


@pytest.mark.parametrize('fn', [lambda x: x + lax.axis_index('i'), lambda x: x * 2],
                         ids=['varying', 'broadcast'])
def test_none_in_axes_with_axis_size(fn):
  # Nothing is mapped: axis_size alone fixes the size.
  check(fn, [rand(3)], in_axes=None, axis_size=4)


# --- out_axes ---------------------------------------------------------------------------------

def _outs(x):
  total = lax.psum(x, 'i')       # the same on every lane
  return x * 3.0, total


@pytest.mark.parametrize('out_axes', [
    0, 1, -1, (0, None), (-1, None), (1, 0),
], ids=['0', '1', 'neg1', 'tuple_none', 'tuple_neg', 'tuple_1_0'])
def test_out_axes(out_axes):
  check(_outs, [rand(N, 2)], out_axes=out_axes)


def test_out_axes_pytree():
  def body(x):
    return {'lane': x + 1.0, 'sum': lax.psum(x, 'i'), 'pair': (x, x * 2)}
  check(body, [rand(N, 2)], out_axes={'lane': 1, 'sum': None, 'pair': (0, -1)})


def test_out_axes_none_for_varying_output_is_an_error():
  f = pmap2(lambda x: x * 2, axis_name='i', out_axes=None)
  with pytest.raises(ValueError, match='out_axes'):
    f(rand(N))


# --- keyword arguments ------------------------------------------------------------------------

def test_keyword_arguments_are_mapped_along_axis_0():
  def body(x, *, scale, shift):
    return x * scale + shift
  x, scale, shift = rand(N, 3), rand(N), rand(N, 3)
  got = check(body, [x], {'scale': scale, 'shift': shift}, in_axes=(None,))
  np.testing.assert_allclose(got, np.asarray(x)[None] * np.asarray(scale)[:, None, None]
                             + np.asarray(shift)[:, None], rtol=1e-5, atol=1e-6)


# --- static_broadcasted_argnums ---------------------------------------------------------------

def test_static_broadcasted_argnums_retraces_with_the_new_value():
  runs = []

  def body(x, n, mode):
    runs.append((n, mode))
    y = x * n
    return y * y if mode == 'square' else y

  f = pmap2(body, axis_name='i', static_broadcasted_argnums=(1, 2))
  x = rand(N, 2)
  for n, mode in [(2, 'square'), (3, 'square'), (3, 'plain')]:
    want = jax.vmap(functools.partial(body, n=n, mode=mode))(x)
    assert_tree_close(f(x, n, mode), want)
  seen = {r for r in runs}
  assert seen == {(2, 'square'), (3, 'square'), (3, 'plain')}
  before = len(runs)
  assert_tree_close(f(x, 2, 'square'), jax.vmap(lambda v: (v * 2) ** 2)(x))
  assert len(runs) == before, 'a repeated static value must hit the cache'


def test_static_argument_negative_index():
  f = pmap2(lambda x, k: x + k, axis_name='i', static_broadcasted_argnums=-1)
  x = rand(N)
  np.testing.assert_allclose(f(x, 5), np.asarray(x) + 5)


# --- donate_argnums ---------------------------------------------------------------------------

def _sharded(x):
  return jax.device_put(x, NamedSharding(Mesh(np.array(jax.devices()), ('i',)), P('i')))


def test_donate_argnums_deletes_a_pre_sharded_argument():
  x = _sharded(rand(N, 4))
  y = rand(N, 4)
  want = np.asarray(x) * 2 + np.asarray(y)
  keep = np.asarray(y)
  out = pmap2(lambda a, b: a * 2 + b, axis_name='i', donate_argnums=0)(x, y)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert x.is_deleted()
  assert not y.is_deleted()
  np.testing.assert_array_equal(np.asarray(y), keep)


def test_donate_argnums_negative_index():
  x, y = rand(N, 4), _sharded(rand(N, 4))
  want = np.asarray(x) + np.asarray(y)
  out = pmap2(lambda a, b: a + b, axis_name='i', donate_argnums=-1)(x, y)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert y.is_deleted() and not x.is_deleted()


def test_donate_argnums_counts_user_positions_after_a_static_argument():
  x = _sharded(rand(N, 4))
  want = np.asarray(x) * 3
  f = pmap2(lambda k, a: a * k, axis_name='i', static_broadcasted_argnums=0, donate_argnums=1)
  np.testing.assert_allclose(f(3, x), want, rtol=1e-6)
  assert x.is_deleted()


# --- collectives ------------------------------------------------------------------------------

COLLECTIVES = {
    'psum': lambda x: lax.psum(x, 'i'),
    'pmean': lambda x: lax.pmean(x, 'i'),
    'pmax': lambda x: lax.pmax(x, 'i'),
    'pmin': lambda x: lax.pmin(x, 'i'),
    'all_gather': lambda x: lax.all_gather(x, 'i'),
    'all_gather_tiled': lambda x: lax.all_gather(x, 'i', tiled=True),
    'ppermute': lambda x: lax.ppermute(x, 'i', [(j, (j + 1) % N) for j in range(N)]),
    'psum_scatter_tiled': lambda x: lax.psum_scatter(x, 'i', scatter_dimension=0, tiled=True),
    'all_to_all': lambda x: lax.all_to_all(x, 'i', split_axis=0, concat_axis=1),
    'axis_index': lambda x: x + lax.axis_index('i'),
    'psum_of_axis_index': lambda x: x * lax.psum(lax.axis_index('i'), 'i'),
}


@pytest.mark.parametrize('name', list(COLLECTIVES))
def test_collective_matches_vmap(name):
  # lanes hold (N, 2) blocks so that scatter / all_to_all have a dimension of size N to split
  check(COLLECTIVES[name], [rand(N, N, 2)])


@pytest.mark.parametrize('name', ['psum', 'all_gather', 'ppermute'])
def test_vmap2_matches_vmap(name):
  fn = COLLECTIVES[name]
  x = rand(N, N, 2)   # the permutation / gather act over N lanes
  got = vmap2(fn, axis_name='i')(x)
  assert_tree_close(got, jax.vmap(fn, axis_name='i')(x))


def test_vmap2_in_out_axes_match_vmap():
  x, y = rand(3, 4), rand(2)
  got = vmap2(_two, in_axes=(1, None), out_axes=1)(x, y)
  assert_tree_close(got, jax.vmap(_two, in_axes=(1, None), out_axes=1)(x, y))


# --- layout of outputs ------------------------------------------------------------------------

@pytest.mark.parametrize('out_axes, spec',
                         [(0, P('i')), (1, P(None, 'i')), (-1, P(None, None, 'i'))])
def test_output_is_sharded_at_the_out_axis(out_axes, spec):
  out = pmap2(lambda x: x + 1, axis_name='i', out_axes=out_axes)(rand(N, 2, 3))
  assert isinstance(out, jax.Array)
  assert isinstance(out.sharding, NamedSharding)
  assert out.sharding.mesh.axis_names == ('i',)
  assert out.sharding.mesh.size == N
  assert out.sharding.spec == spec
  shard = list(out.shape)
  shard[out_axes] = 1
  assert out.addressable_shards[0].data.shape == tuple(shard)


def test_unmapped_output_is_replicated():
  x = rand(N, 2)
  lane, total = pmap2(_outs, axis_name='i', out_axes=(0, None))(x)
  assert total.shape == (2,)
  assert total.sharding.is_fully_replicated
  np.testing.assert_allclose(total, np.asarray(x).sum(0), rtol=1e-5)
  assert lane.sharding.spec == P('i')


def test_devices_picks_the_mesh():
  devices = jax.devices()[:2]
  x = rand(2, 3)
  out = pmap2(lambda v: v - lax.pmean(v, 'i'), axis_name='i', devices=devices)(x)
  np.testing.assert_allclose(out, np.asarray(x) - np.asarray(x).mean(0), rtol=1e-5, atol=1e-6)
  assert out.sharding.device_set == set(devices)
  assert out.sharding.spec == P('i')


def test_devices_of_the_wrong_count_is_an_error():
  with pytest.raises(ValueError, match=r'(?s)2.*3|3.*2'):
    pmap2(lambda v: v, axis_name='i', devices=jax.devices()[:2])(rand(3))


def test_axis_size_smaller_than_device_count():
  x = rand(4, 3)
  out = check(lambda v: v * lax.psum(1.0, 'i') + lax.axis_index('i'), [x], axis_size=4)
  assert len(out.sharding.device_set) == 4


def test_axis_size_contradicting_the_input_is_an_error():
  with pytest.raises(ValueError, match=r'(?s)4.*axis_size|axis_size.*4'):
    pmap2(lambda v: v, axis_name='i', axis_size=2)(rand(4))


# --- composition ------------------------------------------------------------------------------

def _body(x, w):
  return jnp.tanh(x * w) * lax.pmean(x, 'i')


def test_jax_jit_of_stateless_pmap2():
  x, w = rand(N, 3), rand(3)
  f = pmap2(_body, axis_name='i', in_axes=(0, None))
  got = jax.jit(f)(x, w)
  assert_tree_close(got, jax.vmap(_body, in_axes=(0, None), axis_name='i')(x, w))


def test_jax_grad_of_stateless_pmap2():
  x, w = rand(N, 3), rand(3)
  f = pmap2(_body, axis_name='i', in_axes=(0, None))
  ref = jax.vmap(_body, in_axes=(0, None), axis_name='i')
  got = jax.grad(lambda w: f(x, w).sum())(w)
  want = jax.grad(lambda w: ref(x, w).sum())(w)
  assert_tree_close(got, want)
  gx = jax.grad(lambda x: (f(x, w) ** 2).sum())(x)
  assert_tree_close(gx, jax.grad(lambda x: (ref(x, w) ** 2).sum())(x))


def _check_pmap2_of_vmap2(inner):
  x = rand(N, 3, 2)
  got = pmap2(vmap2(inner, axis_name='j'), axis_name='i')(x)
  want = jax.vmap(jax.vmap(inner, axis_name='j'), axis_name='i')(x)
  assert_tree_close(got, want)
  assert got.sharding.spec == P('i')


def test_pmap2_of_vmap2():
  _check_pmap2_of_vmap2(lambda x: x * 2.0 + lax.pmean(x, 'i') + lax.axis_index('j'))


def test_pmap2_of_vmap2_with_inner_collective():
  _check_pmap2_of_vmap2(lambda x: x * lax.psum(x, 'j') + lax.pmean(x, 'i'))


def test_stateful_mapping_with_jax_pmap_matches_vmap():
  x = rand(N, 2)
  f = StatefulMapping(lambda v: v * lax.psum(v, 'i'), axis_name='i', mapping_fn=jax.pmap)
  assert_tree_close(f(x), jax.vmap(lambda v: v * lax.psum(v, 'i'), axis_name='i')(x))


def test_jax_vmap_of_pmap2():
  fn = lambda v: v * lax.psum(v, 'i')  # noqa: E731
  x = rand(3, N)
  got = jax.vmap(pmap2(fn, axis_name='i'))(x)
  assert_tree_close(got, jax.vmap(jax.vmap(fn, axis_name='i'))(x))


def test_nested_pmap2_runs_on_a_2d_mesh():
  inner = lambda v: v * lax.psum(v, 'j') + lax.pmean(v, 'i')  # noqa: E731
  x = rand(2, N // 2, 3)
  got = pmap2(pmap2(inner, axis_name='j'), axis_name='i')(x)
  assert_tree_close(got, jax.vmap(jax.vmap(inner, axis_name='j'), axis_name='i')(x))
  assert got.sharding.spec == P('i', 'j')


# --- argument kinds ---------------------------------------------------------------------------

def test_decorator_form_int_dtype_and_python_scalar():
  @pmap2(axis_name='i', in_axes=(0, None))
  def f(v, k):
    return lax.psum(v, 'i') * k + v

  x = jnp.arange(N, dtype=jnp.int32)
  out = f(x, 3)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, np.arange(N) + 3 * np.arange(N).sum())


def test_numpy_and_list_arguments():
  xs = [np.arange(N, dtype=np.float32), np.ones(N, np.float32)]
  fn = lambda pair: pair[0] * pair[1] + lax.axis_index('i')  # noqa: E731
  got = pmap2(fn, axis_name='i')(xs)
  assert isinstance(got, jax.Array)
  assert_tree_close(got, jax.vmap(fn, axis_name='i')(xs))


def test_vmap2_spmd_axis_name_shards_the_mapped_axis_over_the_mesh():
  mesh = Mesh(np.array(jax.devices()), ('d',))
  x = jax.device_put(rand(N, 3), NamedSharding(mesh, P('d')))

  def f(v):
    return v - lax.pmean(v, 'i')

  out = vmap2(f, axis_name='i', spmd_axis_name='d')(x)
  assert_tree_close(out, jax.vmap(f, axis_name='i')(x))
  assert out.sharding.spec == P('d')
