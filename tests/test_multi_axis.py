"""Multi-axis meshes: `pmap2(mesh=...)` data parallelism with model-sharded states, the
state-aware `jit` keeping that layout, nested `pmap2` on a grown 2-D mesh, inputs sharded on an
Explicit-axis mesh, and the errors of `pmap2(mesh=...)`.

References are plain numpy (the SGD updates) or `jax.vmap`/`vmap2` of the same body.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from helpers import mesh_2x4, nested_step, nested_want
from meshstate import LongTermState, ParamState, State
from meshstate.random import RandomState
from meshstate import transform as T
from meshstate.transform import pmap2, vmap2

D, M = 2, 4
N = jax.device_count()
RNG = np.random.RandomState(3)


@pytest.fixture(params=['Mesh', 'make_mesh'])
def mesh(request):
  return mesh_2x4(request.param)


def rand(*shape):
  return RNG.standard_normal(shape).astype(np.float32)


def spec_of(value):
  """A value's spec with trailing Nones dropped."""
  entries = list(value.sharding.spec)
  while entries and entries[-1] is None:
    entries.pop()
  return P(*entries)


def close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# -- data parallel over 'data', weight sharded over 'model' ---------------------------------------

def test_data_parallel_steps_keep_model_sharding(mesh):
  w0 = rand(3, 8)
  weight = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))
  steps = LongTermState(jnp.zeros((), jnp.int32))
  lr = 0.1

  def step(x, y):
    err = x @ weight.value - y
    grad = lax.pmean(x.T @ err / x.shape[0], 'data')
    weight.value = weight.value - lr * grad
    steps.value = steps.value + 1
    return lax.pmean(jnp.mean(err ** 2), 'data')

  train = pmap2(step, axis_name='data', mesh=mesh, out_axes=None)
  w_ref = w0.astype(np.float64)
  for i in range(10):
    x, y = rand(D, 4, 3), rand(D, 4, 8)
    loss = train(jnp.asarray(x), jnp.asarray(y))
    errs = [xd @ w_ref - yd for xd, yd in zip(x, y)]
    want_loss = np.mean([np.mean(e ** 2) for e in errs])
    w_ref = w_ref - lr * np.mean([xd.T @ e / 4 for xd, e in zip(x, errs)], axis=0)
    assert isinstance(weight.value.sharding, NamedSharding)
    assert spec_of(weight.value) == P(None, 'model'), f'call {i}: {weight.value.sharding}'
    assert weight.value.sharding.mesh.shape == mesh.shape
    assert tuple(weight.value.addressable_shards[0].data.shape) == (3, 2)
    close(weight.value, w_ref)
    close(loss, want_loss)
  assert int(steps.value) == 10


def _model_sharded_training(mesh, kind='pmap2', w0=None):
  """A momentum SGD step over 'data' with its weight and momentum sharded over 'model', as a
  `pmap2` or as a state-aware `shard_map` over 'data' (checked or not)."""
  on = lambda v: jax.device_put(jnp.asarray(v), NamedSharding(mesh, P(None, 'model')))  # noqa
  w, mom = ParamState(on(rand(3, 8) if w0 is None else w0)), State(on(np.zeros((3, 8), np.float32)))
  steps, rng = LongTermState(jnp.zeros((), jnp.int32)), RandomState(4)

  def step(x, y):
    g = T.grad(lambda: jnp.mean((x @ w.value - y) ** 2), grad_states=w)()
    mom.value = 0.9 * mom.value + lax.pmean(g, 'data')
    w.value = w.value - 0.05 * mom.value * (1 + 0.01 * lax.pmean(rng.uniform(), 'data'))
    steps.value = steps.value + 1
    return lax.pmean(jnp.mean((x @ w.value - y) ** 2), 'data')

  if kind == 'pmap2':
    return (w, mom, steps, rng), pmap2(step, axis_name='data', mesh=mesh, out_axes=None)
  step_shards = T.shard_map(lambda x, y: step(x[0], y[0]), mesh, P('data'), P(),
                            axis_names={'data'}, check_vma=kind == 'shard_map')
  return (w, mom, steps, rng), step_shards


def test_grad_through_a_model_sharded_pmap2_on_explicit_mesh():
  # The loss is typed on the mesh: an eager grad needs it in the context (JAX's rule), a
  # jit does not.
  mesh = mesh_2x4('make_mesh')
  w0, x = rand(3, 8), rand(D, 5, 3)
  w = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))
  f = pmap2(lambda x: lax.pmean(jnp.sum(jnp.sin(x @ w.value)), 'data'), axis_name='data',
            mesh=mesh, out_axes=None)
  want = jax.grad(lambda w: jnp.mean(jnp.stack([jnp.sum(jnp.sin(xd @ w)) for xd in x])))(w0)
  with jax.set_mesh(mesh):
    eager = T.grad(lambda: f(jnp.asarray(x)), grad_states=w)()
  jitted = T.jit(T.grad(lambda: T.checkpoint(f)(jnp.asarray(x)), grad_states=w))()
  for g in (eager, jitted):
    close(g, want)
    assert spec_of(g) == P(None, 'model')


@pytest.mark.parametrize('kind, loop', [
    ('pmap2', 'jit(for_loop)'), ('pmap2', 'scan'), ('pmap2', 'jit(cond)'),
    ('shard_map', 'jit(for_loop)'), ('shard_map unchecked', 'scan')])
def test_loops_around_a_model_sharded_step_equal_its_eager_steps(mesh, kind, loop):
  # Inside another transform the states are its tracers, typed on the whole mesh: the body's
  # views must be typed as lanes ('model' kept, 'data' manual), or an Explicit mesh fails with
  # "context mesh ... should match the aval mesh".
  states, step = _model_sharded_training(mesh, kind)
  xs, ys = jnp.asarray(rand(4, D, 5, 3)), jnp.asarray(rand(4, D, 5, 8))
  start = [s.value for s in states]
  eager = jnp.stack([step(x, y) for x, y in zip(xs, ys)])
  after = [s.value for s in states]
  for s, v in zip(states, start):
    s.value = v
  if loop == 'jit(for_loop)':
    got = T.jit(lambda xs, ys: T.for_loop(step, xs, ys))(xs, ys)
  elif loop == 'scan':
    got = T.scan(lambda c, xy: (c, step(*xy)), 0, (xs, ys))[1]
  else:
    run = T.jit(lambda x, y, go: T.cond(go, step, lambda x, y: jnp.float32(0), x, y))
    got = jnp.stack([run(x, y, True) for x, y in zip(xs, ys)])
  close(got, eager)
  for s, v in zip(states, after):
    close(s.value, v)
  assert spec_of(states[0].value) == P(None, 'model') and int(states[2].value) == 4


def test_random_draws_of_a_checked_shard_map_in_scan_equal_its_eager_draws(mesh):
  # The key is an enclosing trace's value typed on the whole (Explicit) mesh; the body's view
  # of it must be typed by the body's mesh, where 'data' is manual.
  rng = RandomState(1)
  f = T.shard_map(lambda xb: (xb[0].sum() + rng.uniform())[None], mesh, P('data'), P('data'),
                  axis_names={'data'})
  xs = jnp.asarray(rand(3, D, 5, 3))
  f(xs[0])   # the key now holds the program's output, laid out on the mesh
  start = rng.value
  eager = jnp.stack([f(x) for x in xs])
  after, rng.value = rng.value, start
  got = T.scan(lambda c, x: (c, f(x)), 0, xs)[1]
  close(got, eager)
  np.testing.assert_array_equal(rng.value, after)
  assert len(set(np.asarray(eager).ravel().tolist())) == eager.size   # lanes and steps differ


@pytest.mark.parametrize('kind', ['pmap2', 'shard_map', 'shard_map unchecked'])
def test_a_data_parallel_step_keeps_a_model_sharded_state_on_the_model_axis(mesh, kind):
  # Specs name the manual axes only ('data'); JAX's shard_map keeps an input's layout over
  # the others, and pmap2(mesh=...) over 'data' keeps it: so should the state-aware shard_map.
  w = ParamState(jax.device_put(jnp.asarray(rand(3, 8)), NamedSharding(mesh, P(None, 'model'))))

  def step(x):
    w.value = w.value - 0.1 * lax.pmean(jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w.value),
                                        'data')
    return x.sum()

  if kind == 'pmap2':
    f = pmap2(step, axis_name='data', mesh=mesh)
  else:
    f = T.shard_map(lambda x: step(x[0])[None], mesh, P('data'), P('data'),
                    axis_names={'data'}, check_vma=kind == 'shard_map')
  x = jnp.asarray(rand(D, 5, 3))
  w0 = np.asarray(w.value)
  f(x)
  assert spec_of(w.value) == P(None, 'model')
  grads = [2 * xd.T @ (xd @ w0) for xd in np.asarray(x)]
  # checked: the gradient of a value the same on every 'data' shard is summed over them
  grad = np.sum(grads, axis=0) if kind == 'shard_map' else np.mean(grads, axis=0)
  close(w.value, w0 - 0.1 * grad)


def test_stateful_jit_keeps_model_sharding(mesh):
  w0 = rand(3, 8)
  weight = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))

  @meshstate.transform.jit
  def decay(scale):
    weight.value = weight.value * scale + 1.0
    return jnp.sum(weight.value)

  total = decay(jnp.float32(0.5))
  close(weight.value, w0 * 0.5 + 1)
  close(total, (w0 * 0.5 + 1).sum())
  assert spec_of(weight.value) == P(None, 'model')
  decay(jnp.float32(2.0))
  close(weight.value, (w0 * 0.5 + 1) * 2 + 1)
  assert spec_of(weight.value) == P(None, 'model')


@pytest.mark.parametrize('kind', ['pmap2', 'jit'])
def test_a_pytree_state_keeps_each_leafs_layout(mesh, kind):
  # An optimizer state, say: each leaf keeps its own layout, as a one-array state does (the
  # compiler laid the leaves out as it liked before, e.g. a replicated one over 'model').
  on = lambda v, *spec: jax.device_put(jnp.asarray(v), NamedSharding(mesh, P(*spec)))  # noqa
  w0 = rand(4, 8)
  w = ParamState(on(w0, None, 'model'))
  opt = State({'mu': on(np.zeros((4, 8), np.float32)), 'nu': on(np.zeros((4, 8), np.float32),
                                                                 None, 'model'),
               'count': on(np.zeros((), np.int32))})

  def step(x):
    g = w.value * (lax.pmean(x.mean(), 'data') if kind == 'pmap2' else x.mean())
    o = opt.value
    opt.value = {'mu': o['mu'] + g, 'nu': o['nu'] + g * g, 'count': o['count'] + 1}
    return x

  f = pmap2(step, axis_name='data', mesh=mesh) if kind == 'pmap2' else T.jit(step)
  x = jnp.ones((D, 3))
  f(x)
  f(x)
  specs = {k: spec_of(v) for k, v in opt.value.items()}
  assert specs == {'mu': P(), 'nu': P(None, 'model'), 'count': P()}
  opt.value = {**opt.value, 'mu': on(opt.value['mu'], None, 'model')}   # resharded by hand
  f(x)
  assert spec_of(opt.value['mu']) == P(None, 'model')
  assert spec_of(opt.value['nu']) == P(None, 'model') and spec_of(opt.value['count']) == P()
  g = w0
  close(opt.value['mu'], 3 * g)
  close(opt.value['nu'], 3 * g * g)
  assert int(opt.value['count']) == 3


def test_state_mapped_over_data_and_sharded_over_model(mesh):
  buf0 = rand(D, 8)
  buf = State(jax.device_put(jnp.asarray(buf0), NamedSharding(mesh, P('data', 'model'))))

  def step(x):
    buf.value = buf.value * 2 + jnp.sum(x)
    return x

  f = pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: buf}, state_out_axes={0: buf})
  x = rand(D, 3)
  f(jnp.asarray(x))
  close(buf.value, buf0 * 2 + x.sum(axis=1, keepdims=True))
  assert spec_of(buf.value) == P('data', 'model')


def test_input_sharded_over_both_axes_keeps_model_split(mesh):
  x = rand(D, 8)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('data', 'model')))
  out = pmap2(lambda v: v * 2 + lax.psum(v, 'data'), axis_name='data', mesh=mesh)(xs)
  close(out, x * 2 + x.sum(axis=0))
  assert spec_of(out) == P('data', 'model')


def test_mapping_a_non_leading_dim_over_the_mesh(mesh):
  x = rand(3, D)
  f = pmap2(lambda v: v * 2 + lax.psum(v, 'data'), axis_name='data', mesh=mesh, in_axes=1,
            out_axes=1)
  close(f(jnp.asarray(x)), x * 2 + x.sum(axis=1, keepdims=True))


def test_nested_pmap2_over_the_axes_of_a_given_mesh(mesh):
  x = rand(D, M)
  inner = pmap2(lambda v: lax.psum(v, 'model') * 10 + lax.psum(v, 'data'), axis_name='model')
  got = pmap2(inner, axis_name='data', mesh=mesh)(jnp.asarray(x))
  close(got, x.sum(axis=1, keepdims=True) * 10 + x.sum(axis=0, keepdims=True))


# -- nested pmap2 ---------------------------------------------------------------------------------

def body(x):
  within_row = lax.psum(x, 'j')
  within_col = lax.psum(x, 'i')
  return (within_row * 10 + within_col + 100 * lax.axis_index('i')
          + 1000 * lax.axis_index('j') + x * x)


def test_nested_pmap2_equals_nested_vmap():
  x = jnp.asarray(rand(2, 4))
  got = pmap2(pmap2(body, axis_name='j'), axis_name='i')(x)
  by_vmap2 = vmap2(vmap2(body, axis_name='j'), axis_name='i')(x)
  by_jax = jax.vmap(jax.vmap(body, axis_name='j'), axis_name='i')(x)
  assert got.shape == (2, 4)
  close(by_vmap2, by_jax)
  close(got, by_jax)
  xs = np.asarray(x)   # and numpy, to pin what the collectives mean
  i, j = np.indices((2, 4))
  close(got, xs.sum(1, keepdims=True) * 10 + xs.sum(0, keepdims=True) + 100 * i + 1000 * j
        + xs * xs)


def test_nested_pmap2_with_a_written_state():
  total = State(jnp.zeros(()))

  def inner(x):
    total.value = lax.psum(lax.psum(x, 'j'), 'i')
    return x * 2

  x = rand(2, 4)
  out = pmap2(pmap2(inner, axis_name='j'), axis_name='i')(jnp.asarray(x))
  close(out, x * 2)
  close(total.value, x.sum())


def test_nested_pmap2_read_modify_write_state():
  count = State(jnp.zeros(()))

  def inner(x):
    count.value = count.value + 1.0
    return x

  x = jnp.ones((2, 4))
  pmap2(pmap2(inner, axis_name='j'), axis_name='i')(x)
  ref = State(jnp.zeros(()))
  vmap2(vmap2(lambda v: (setattr(ref, 'value', ref.value + 1.0), v)[1], axis_name='j'),
        axis_name='i')(x)
  close(count.value, ref.value)


# -- meshstate mappings nested in one another: steps of a pmap(pmap) migration ------------------

@pytest.mark.parametrize('outer_kind,inner_kind,check_vma', [
    ('shard_map', 'pmap2', True), ('shard_map', 'pmap2', False), ('shard_map', 'shard_map', True),
    ('shard_map', 'shard_map', False), ('pmap2', 'shard_map', True)])
def test_a_mapping_nested_in_another_maps_over_its_own_axis(outer_kind, inner_kind, check_vma,
                                                             mesh):
  count = State(jnp.zeros(()))
  f, _ = nested_step(outer_kind, inner_kind, mesh, count, outer_check=check_vma,
                     inner_check=check_vma)
  x = rand(D * M, 3)
  outs = [f(jnp.asarray(x)), f(jnp.asarray(x))]
  for out in outs:
    close(out, nested_want(x))
  close(count.value, 2 * x.sum())
  assert not isinstance(count.value, jax.core.Tracer)


@pytest.mark.parametrize('outer_kind', ['shard_map', 'pmap2'])
@pytest.mark.parametrize('inner_kind', ['shard_map', 'pmap2'])
def test_random_draws_in_a_nested_mapping_differ_per_device_and_advance_once(outer_kind,
                                                                             inner_kind, mesh):
  rng = RandomState(0)

  def inner(v):
    return v + rng.uniform(size=v.shape)

  g = (pmap2(inner, axis_name='model') if inner_kind == 'pmap2' else
       T.shard_map(inner, in_specs=P('model'), out_specs=P('model'), axis_names={'model'}))
  if outer_kind == 'pmap2':
    f = pmap2(lambda b: g(b), axis_name='data', mesh=mesh)
    call = lambda: f(jnp.zeros((D, M, 3)))  # noqa: E731
  else:
    f = T.shard_map(lambda b: g(b), mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                    axis_names={'data'})
    call = lambda: f(jnp.zeros((D * M, 3)))  # noqa: E731
  keys = [np.asarray(jax.random.key_data(rng.value))]
  draws = []
  for _ in range(2):
    draws.append(np.asarray(call()).ravel())
    keys.append(np.asarray(jax.random.key_data(rng.value)))
  assert all(len(np.unique(d)) == D * M * 3 for d in draws)   # per (data, model) device
  assert ((draws[0] >= 0) & (draws[0] < 1)).all() and not np.array_equal(*draws)
  assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])


def test_a_state_split_by_a_nested_pmap2_keeps_the_layout_of_its_spec(mesh):
  # The shard_map lays w out by its spec, P('data'), replicated over 'model'; the pmap2 in its
  # body splits each block over 'model'. A call writes w back as it was laid out, so the next
  # call takes it as it is (before: split over both axes, and moved back on every call).
  w0 = rand(D * M, 3)
  w = ParamState(jnp.asarray(w0))
  g = pmap2(lambda v: (setattr(w, 'value', w.value * 2 + v), v)[1], axis_name='model',
            state_in_axes={0: w}, state_out_axes={0: w})
  f = T.shard_map(lambda b: g(b), mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                  axis_names={'data'}, state_in_specs={w: P('data')},
                  state_out_specs={w: P('data')})
  x = rand(D * M, 3)
  for _ in range(3):
    f(jnp.asarray(x))
  close(w.value, ((w0 * 2 + x) * 2 + x) * 2 + x)
  assert spec_of(w.value) == P('data')
  info, inner = f.cache_info(), g.cache_info()
  assert (info.hits, info.misses) == (2, 1)
  assert (inner.hits, inner.misses) == (0, 1)   # one lookup, traced in f's body


def test_cache_info_counts_explain_as_a_lookup(mesh):
  f = pmap2(lambda v: v * 2, axis_name='data', mesh=mesh)
  x = jnp.ones((D, 3))
  f.explain(x)
  assert f.cache_info()[:2] == (0, 1)
  f(x)
  assert f.cache_info()[:2] == (1, 1)


def test_a_mapping_inside_jax_shard_map_names_the_enclosing_one(mesh):
  count = State(jnp.ones(()))
  g = pmap2(lambda v: v * 2, axis_name='model')
  h = T.shard_map(lambda v: v * 2, in_specs=P('model'), out_specs=P('model'),
                  axis_names={'model'})
  for name, inner in [('pmap2', g), ('shard_map', h)]:
    f = jax.jit(jax.shard_map(lambda b, inner=inner: inner(b) + count.value, mesh=mesh,
                              in_specs=P('data'), out_specs=P('data'), axis_names={'data'}))
    x = jax.device_put(jnp.ones((D * M, 3)), NamedSharding(mesh, P('data')))
    with pytest.raises(ValueError, match=rf"{name} was called inside the body of JAX's own "
                                         r"shard_map .* manual over mesh axes \['data'\]; .* "
                                         r"Make the enclosing one meshstate.transform.shard_map"):
      f(x)
  close(count.value, 1.0)


# -- inputs sharded on an Explicit-axis mesh ------------------------------------------------------

def test_pmap2_accepts_input_sharded_on_explicit_mesh():
  mesh = jax.make_mesh((N,), ('i',))
  x = rand(N, 2)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('i')))
  out = pmap2(lambda v: v * 2 + lax.psum(v, 'i'), axis_name='i')(xs)
  close(out, x * 2 + x.sum(axis=0))


def test_vmap2_draws_per_lane_on_an_input_sharded_on_explicit_mesh():
  # jax.vmap needs a context mesh for what it batches itself (a lane's key, axis_index):
  # without one it fails with "Resource axis: i ... not found in mesh: ()".
  x = rand(N, 2)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(jax.make_mesh((N,), ('i',)), P('i')))
  rs = RandomState(0)
  f = vmap2(lambda v: v + jax.random.uniform(rs.split_key(), v.shape) + lax.axis_index('k'),
            axis_name='k')
  got = [f(xs), f(xs)]
  assert got[0].sharding.spec == P('i', None)
  rs.seed(0)
  want = [f(jnp.asarray(x)), f(jnp.asarray(x))]   # unsharded: the same keys, the same draws
  for g, w in zip(got, want):
    close(g, w)
  assert len(np.unique(np.asarray(got[0] - x - np.arange(N)[:, None]))) == 2 * N
  assert not np.allclose(got[0], got[1])


def test_vmap2_per_lane_state_on_no_mesh_follows_an_explicit_batch():
  # jax.vmap refuses mapped inputs laid out differently along the mapped dimension ("should
  # be sharded the same"): a per-lane state made with jnp.zeros follows the sharded batch.
  x = rand(N, 3)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(jax.make_mesh((N,), ('i',)), P('i')))
  h = State({'c': jnp.zeros((N, 3)), 'n': jnp.zeros(N, jnp.int32)})

  def step(v):
    c, _ = lax.scan(lambda c, _: (jnp.tanh(c + v), None), h.value['c'], None, length=2)
    h.value = {'c': c, 'n': h.value['n'] + 1}
    return c.sum()

  f = vmap2(step, state_in_axes={0: h}, state_out_axes={0: h})
  got = [f(xs), f(xs)]
  c = np.zeros((N, 3))
  for g in got:
    for _ in range(2):
      c = np.tanh(c + x)
    close(g, c.sum(axis=1))
  close(h.value['c'], c)
  assert h.value['n'].tolist() == [2] * N and spec_of(h.value['c']) == P('i')


def test_vmap2_draws_per_lane_with_a_state_sharded_on_explicit_mesh_and_a_plain_batch():
  # Only the per-lane state is typed by the mesh: the program runs under its mesh, and so
  # must what it batches (the lane keys, the draws' jitted functions), or JAX fails with
  # "Resource axis: i ... not found in mesh: ()".
  x, w0 = rand(N, 3), rand(N, 3)
  rs, w = RandomState(0), ParamState(jax.device_put(
      jnp.asarray(w0), NamedSharding(jax.make_mesh((N,), ('i',)), P('i'))))

  def step(v):
    w.value = w.value * 0.5 + v
    return v.sum() + rs.uniform()

  f = vmap2(step, state_in_axes={0: w}, state_out_axes={0: w})
  got = [f(jnp.asarray(x)), f(jnp.asarray(x))]
  rs.seed(0)
  w_plain = ParamState(jnp.asarray(w0))
  ref = vmap2(lambda v: (setattr(w_plain, 'value', w_plain.value * 0.5 + v), v.sum() +
                         rs.uniform())[1], state_in_axes={0: w_plain},
              state_out_axes={0: w_plain})
  want = [ref(jnp.asarray(x)), ref(jnp.asarray(x))]
  for g, r in zip(got, want):
    close(g, r)
  close(w.value, w_plain.value)
  assert spec_of(w.value) == P('i') and len(np.unique(np.asarray(got[0]).round(5))) == N


def test_random_state_seeded_inside_vmap2_on_an_explicit_input():
  # Seeding makes a key eagerly; under the input's abstract mesh that failed to lower
  # ("... required when only AbstractMesh exists").
  x = rand(N, 2)
  xs = jax.device_put(jnp.asarray(x), NamedSharding(jax.make_mesh((N,), ('i',)), P('i')))
  f = vmap2(lambda v: v + RandomState(5).uniform(size=v.shape))
  close(f(xs), f(jnp.asarray(x)))
  close(meshstate.transform.jit(lambda v: f(v) * 2)(xs), 2 * f(jnp.asarray(x)))


def _on_another_explicit_mesh(value):
  """`value` laid out along 'e' of a 1-D Explicit mesh of all devices (its type says so)."""
  other = jax.make_mesh((N,), ('e',), axis_types=(jax.sharding.AxisType.Explicit,))
  return jax.device_put(value, NamedSharding(other, P('e')))


def _accumulator(kind, w):
  def step(v):
    w.value = w.value + v
    return v * 2
  own = jax.sharding.Mesh(np.array(jax.devices()), ('i',))
  if kind.startswith('shard_map'):
    return meshstate.transform.shard_map(step, own, P('i'), P('i'), state_in_specs={w: P('i')},
                                         state_out_specs={w: P('i')},
                                         check_vma=kind == 'shard_map')
  return pmap2(step, axis_name='i', state_in_axes={0: w}, state_out_axes={0: w},
               mesh=own if kind == 'pmap2(mesh=)' else None)


@pytest.mark.parametrize('kind', ['pmap2', 'pmap2(mesh=)', 'shard_map', 'shard_map unchecked'])
def test_state_typed_by_another_explicit_mesh_is_moved_onto_the_mapping_mesh(kind):
  # JAX's shard_map fails on such a value (a KeyError naming the other mesh's axis).
  x = rand(N, 2)
  w = State(_on_another_explicit_mesh(jnp.zeros((N, 2))))
  f = _accumulator(kind, w)
  close(f(jnp.asarray(x)), 2 * x)
  f(jnp.asarray(x))
  f(jnp.asarray(x))   # a direct call
  assert w.value.sharding.mesh.axis_names == ('i',)
  w.value = _on_another_explicit_mesh(w.value)   # replaced between two direct calls
  f(jnp.asarray(x))
  close(w.value, 4 * x)
  assert w.value.sharding.mesh.axis_names == ('i',)


def test_shard_map_moves_an_argument_typed_by_another_explicit_mesh():
  x = rand(N, 2)
  w = State(jnp.zeros((N, 2)))
  for check in ('shard_map', 'shard_map unchecked'):
    f = _accumulator(check, w)
    close(f(_on_another_explicit_mesh(jnp.asarray(x))), 2 * x)
    close(f(_on_another_explicit_mesh(jnp.asarray(x))), 2 * x)
  close(w.value, 4 * x)


# -- random draws on a multi-axis mesh ------------------------------------------------------------

def test_random_key_already_on_explicit_mesh():
  mesh = mesh_2x4('make_mesh')
  rs = RandomState(0)
  rs.value = jax.device_put(rs.value, NamedSharding(mesh, P()))
  f = pmap2(lambda x: x + jax.random.normal(rs.split_key(), x.shape), axis_name='data', mesh=mesh)
  out = np.asarray(f(jnp.zeros((D, 3))))
  assert not np.array_equal(out[0], out[1])


def test_random_draws_differ_across_data_on_auto_mesh():
  mesh = mesh_2x4('Mesh')
  rs = RandomState(0)
  k0 = np.asarray(rs.value)
  f = pmap2(lambda x: x + jax.random.normal(rs.split_key(), x.shape), axis_name='data', mesh=mesh)
  out = np.asarray(f(jnp.zeros((D, 3))))
  assert not np.array_equal(out[0], out[1])
  assert not np.array_equal(np.asarray(rs.value), k0)


@pytest.mark.parametrize('axes', ['2x4', '1-D'])
def test_several_lanes_per_device_draw_and_index_on_explicit_mesh(axes):
  # Two lanes per 'data' device run as a vmap: on Explicit axes it needs the mesh in context
  # for the lane keys and axis_index it batches ("Resource axis: data ... not found" before,
  # on a 1-D mesh also from the random draws' own jitted functions).
  def make(kind):
    if axes == '2x4':
      return mesh_2x4(kind)
    devices = np.array(jax.devices()[:8])
    return (Mesh(devices, ('data',)) if kind == 'Mesh' else
            Mesh(devices, ('data',), axis_types=(jax.sharding.AxisType.Explicit,)))

  def run(kind):
    mesh = make(kind)
    lanes = 2 * mesh.shape['data']
    rs, w = RandomState(0), ParamState(jnp.ones((lanes, 3)))

    def step(x):
      w.value = w.value * 2 + x
      return x + rs.uniform() + lax.axis_index('data')
    f = pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: w}, state_out_axes={0: w})
    x = jnp.arange(lanes * 3.0).reshape(lanes, 3)
    return [f(x), f(x)], w.value, x

  (outs, w, x), (want, w_auto, _) = run('make_mesh'), run('Mesh')
  for got, ref in zip(outs, want):
    close(got, ref)
  close(w, w_auto)
  close(w, 4 + 3 * x)
  draws = np.asarray(outs[0]) - x - np.arange(len(x))[:, None]
  assert len(np.unique(draws[:, 0].round(5))) == len(x)   # each lane its own key
  assert outs[0].sharding.spec[0] == 'data'



@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_several_lanes_per_device_keep_a_state_laid_out_over_another_axis(kind):
  # As with one lane per device, a state keeps its 'model' layout; the lanes split over 'data'.
  mesh = mesh_2x4(kind)
  lanes = 2 * mesh.shape['data']
  w0, x = rand(lanes, 8), rand(lanes, 8)
  w = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))

  def step(v):
    w.value = w.value * 2 + v
    return v.sum()
  f = pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: w}, state_out_axes={0: w})
  f(jnp.asarray(x))
  close(f(jnp.asarray(x)), x.sum(1))
  close(w.value, 4 * w0 + 3 * x)
  assert spec_of(w.value) == P('data', 'model')
  assert f.cache_info().misses == 1



@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_vmap2_over_a_batch_on_a_mesh_keeps_a_model_sharded_state(kind):
  # vmap2 places states made on no mesh onto the batch's mesh; one laid out there stays so.
  mesh = mesh_2x4(kind)
  w0, x = rand(3, 8), rand(4, 3)
  w = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))

  def step(v):
    w.value = w.value * 0.5
    return v @ w.value
  f = vmap2(step, axis_name='i')
  xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P('data')))
  outs = [f(xs) for _ in range(3)]
  close(outs[-1], x @ (w0 / 8))
  close(w.value, w0 / 8)
  assert spec_of(w.value) == P(None, 'model') and f.cache_info().misses == 1


# -- under a context mesh (jax.set_mesh) ----------------------------------------------------------

@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_pmap2_without_a_mesh_maps_over_the_context_mesh(kind):
  # As pmap2(mesh=the context mesh); it failed inside JAX ("use_abstract_mesh cannot change
  # the size of the mesh"), and so does jax.pmap there.
  mesh = mesh_2x4(kind)
  x, w0 = rand(D, 5, 3), rand(3, 8)

  def run(**mesh_kw):
    states, step = _model_sharded_training(mesh, w0=w0)
    step = pmap2(step.origin_fun, axis_name='data', out_axes=None, **mesh_kw)
    with jax.set_mesh(mesh):
      losses = [step(jnp.asarray(x), jnp.asarray(x[..., :1] * 2)) for _ in range(3)]
      epoch = T.jit(lambda xs: T.for_loop(lambda x: step(x, x[..., :1]), xs))(jnp.asarray(x)[None])
    return losses + [epoch[0]], states, step

  got, states, step = run()
  want, want_states, want_step = run(mesh=mesh)
  for g, w in zip(got, want):
    close(g, w)
  for s, w in zip(states, want_states):
    close(s.value, w.value)
  assert spec_of(states[0].value) == P(None, 'model')
  assert step.cache_info() == want_step.cache_info() and step.cache_info().currsize > 0
  with jax.set_mesh(mesh):
    explanation = step.explain(jnp.asarray(x), jnp.asarray(x[..., :1]))
  assert explanation.mesh.shape == mesh.shape


def test_calls_in_and_out_of_a_context_mesh_reuse_their_programs():
  # Each call leaves the state laid out by its own program; the next one (in or out of the
  # context) moves it back and reuses its program instead of tracing a new one every call.
  total = State(jnp.zeros(()))
  f = pmap2(lambda x: setattr(total, 'value', total.value + lax.psum(x, 'data')) or x,
            axis_name='data')
  mesh = mesh_2x4('make_mesh')
  for i in range(6):
    if i % 2:
      with jax.set_mesh(mesh):
        f(jnp.ones(D))
    else:
      f(jnp.ones(D))
  assert float(total.value) == 6 * D
  assert f.cache_info().misses == 2 and f.cache_info().currsize == 2


@pytest.mark.parametrize('kind', ['pmap2', 'pmap2(mesh=)', 'shard_map'])
def test_a_state_replaced_from_another_mesh_on_every_call_reuses_the_program(kind):
  x = rand(N, 2)
  w = State(_on_another_explicit_mesh(jnp.zeros((N, 2))))
  f = _accumulator(kind, w)
  for _ in range(4):
    f(jnp.asarray(x))
    w.value = _on_another_explicit_mesh(w.value)   # e.g. a checkpoint restored elsewhere
  close(w.value, 4 * x)
  assert f.cache_info().misses == 1


def test_pmap2_under_a_context_mesh_without_its_axis():
  w = State(jnp.ones(3))
  f = pmap2(lambda x: setattr(w, 'value', w.value + lax.psum(x, 'i')) or x, axis_name='i')
  with jax.set_mesh(mesh_2x4('make_mesh')):
    with pytest.raises(ValueError, match=r"called under a context mesh \(jax.set_mesh\) with "
                                         r"axes \{'data': 2, 'model': 4\}.*axis_name='i'"):
      f(jnp.ones((N, 3)))
  close(w.value, np.ones(3))
  close(f(jnp.ones((N, 3))), np.ones((N, 3)))   # outside it, on its own mesh
  close(w.value, np.ones(3) + N)


# -- errors ---------------------------------------------------------------------------------------

def test_error_axis_name_not_in_mesh(mesh):
  f = pmap2(lambda x: x, axis_name='batch', mesh=mesh)
  with pytest.raises(ValueError) as err:
    f(jnp.ones((D, 3)))
  msg = str(err.value)
  assert 'batch' in msg and 'data' in msg and 'model' in msg


def test_error_mapped_size_differs_from_mesh_axis(mesh):
  w = State(jnp.ones(3))
  f = pmap2(lambda x: x + w.value, axis_name='data', mesh=mesh)
  with pytest.raises(ValueError) as err:
    f(jnp.ones((4 * D + 1, 3)))
  msg = str(err.value)
  assert str(4 * D + 1) in msg and str(D) in msg and 'data' in msg
  np.testing.assert_array_equal(np.asarray(w.value), np.ones(3))


def test_error_mesh_without_axis_name(mesh):
  with pytest.raises(ValueError):
    pmap2(lambda x: x, mesh=mesh)


# -- gradients inside pmap2 -----------------------------------------------------------------------

def test_grad_of_broadcast_state_is_per_device():
  w = ParamState(jnp.float32(1.0))
  x = jnp.arange(N, dtype=jnp.float32)
  got = pmap2(lambda v: jax.grad(lambda p: p * v)(w.value), axis_name='i')(x)
  close(got, vmap2(lambda v: jax.grad(lambda p: p * v)(w.value), axis_name='i')(x))
  close(got, x)   # d(p * x_i)/dp on device i


def test_data_parallel_jax_grad_step_on_mesh():
  mesh = mesh_2x4('Mesh')
  w0, x, y = rand(3, 8), rand(D, 4, 3), rand(D, 4, 8)
  weight = ParamState(jax.device_put(jnp.asarray(w0), NamedSharding(mesh, P(None, 'model'))))

  def step(xb, yb):
    grad = jax.grad(lambda w: jnp.mean((xb @ w - yb) ** 2))(weight.value)
    weight.value = weight.value - 0.1 * lax.pmean(grad, 'data')
    return xb

  pmap2(step, axis_name='data', mesh=mesh)(jnp.asarray(x), jnp.asarray(y))
  xf, yf = x.reshape(-1, 3), y.reshape(-1, 8)
  close(weight.value, w0 - 0.1 * 2 * xf.T @ (xf @ w0 - yf) / yf.size)
