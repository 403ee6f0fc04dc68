"""Stateful `pmap2`: how states are mapped in, written back, and kept intact on errors.

One test per rule of the SPEC's write-back list ("StatefulMapping / pmap2 / vmap2") and per
rule of "Atomicity and errors". Expected values come from numpy or from `jax.vmap` of the same
body with the state passed explicitly.
"""
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate import BatchAxisError, HiddenState, ParamState, ShortTermState, State
from meshstate.random import RandomState
from meshstate.transform import StatefulMapping, _engine, pmap2, vmap2
from meshstate.util.filter import OfType, PathContains

from helpers import N, close, no_tracer, rand


def snapshot(*states):
  return [np.asarray(s.value) for s in states]


def assert_unchanged(states, before):
  no_tracer(*states)
  for s, b in zip(states, before):
    assert np.shape(s.value) == b.shape
    np.testing.assert_array_equal(np.asarray(s.value), b)


def mesh_sharded(x, spec):
  return jax.device_put(x, NamedSharding(Mesh(np.array(jax.devices()), ('i',)), spec))


@pytest.fixture
def no_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    yield


# --- declared state_out_axes ------------------------------------------------------------------

@pytest.mark.parametrize('axis, spec', [(0, P('i')), (1, P(None, 'i')), (-1, P(None, 'i'))])
def test_declared_out_axis_shards_the_state_there(axis, spec, no_warnings):
  acc = ShortTermState(jnp.zeros(3))
  x = rand(N, 3)

  def step(v):
    acc.value = acc.value + v * 2.0
    return v

  pmap2(step, axis_name='i', state_out_axes={axis: acc})(x)
  want = np.asarray(x) * 2.0
  expected = want if axis == 0 else want.T
  assert acc.value.shape == expected.shape
  close(acc.value, expected)
  assert isinstance(acc.value.sharding, NamedSharding)
  assert acc.value.sharding.spec == spec
  assert acc.spec == spec


def test_declared_in_and_out_axes_keep_a_per_device_state(no_warnings):
  h = HiddenState(rand(N, 3))
  h0 = np.asarray(h.value)
  x = rand(N, 3)

  def step(v):
    h.value = jnp.tanh(h.value + v)
    return h.value.sum()

  f = pmap2(step, axis_name='i', state_in_axes={0: OfType(HiddenState)},
            state_out_axes={0: OfType(HiddenState)})
  out = f(x)
  close(h.value, np.tanh(h0 + np.asarray(x)))
  close(out, np.tanh(h0 + np.asarray(x)).sum(1))
  assert h.value.sharding.spec == P('i')
  f(x)
  close(h.value, np.tanh(np.tanh(h0 + np.asarray(x)) + np.asarray(x)))


# --- undeclared writes ------------------------------------------------------------------------

@pytest.mark.parametrize('policy', ['auto', 'warn', 'ignore', 'raise'])
def test_write_equal_on_every_lane_stays_unmapped(policy, no_warnings):
  total = State(jnp.zeros(3))
  x = rand(N, 3)

  def step(v):
    total.value = total.value + lax.psum(v, 'i')
    return v

  pmap2(step, axis_name='i', unexpected_out_state_mapping=policy)(x)
  assert total.value.shape == (3,)
  close(total.value, np.asarray(x).sum(0))


def _write_per_lane(state, x, policy):
  def step(v):
    state.value = v * 3.0
    return v
  return pmap2(step, axis_name='i', unexpected_out_state_mapping=policy)(x)


def test_policy_warn_gathers_along_axis_0_with_a_warning():
  s = ShortTermState(jnp.zeros(2))
  x = rand(N, 2)
  with pytest.warns(UserWarning, match='ShortTermState'):
    _write_per_lane(s, x, 'warn')
  assert s.value.shape == (N, 2)
  close(s.value, np.asarray(x) * 3.0)


def test_policy_ignore_gathers_silently(no_warnings):
  s = ShortTermState(jnp.zeros(2))
  x = rand(N, 2)
  _write_per_lane(s, x, 'ignore')
  assert s.value.shape == (N, 2)
  close(s.value, np.asarray(x) * 3.0)


def test_policy_raise_names_the_state_and_writes_nothing():
  other = State(jnp.ones(2))
  s = meshstate.LongTermState(jnp.zeros(2))
  before = snapshot(other, s)

  def step(v):
    other.value = other.value + lax.psum(v, 'i')    # a valid write, made first
    s.value = v * 3.0                                # per-lane, undeclared
    return v

  f = pmap2(step, axis_name='i', unexpected_out_state_mapping='raise')
  with pytest.raises(BatchAxisError, match="LongTermState.*across the mapped axis 'i', but"):
    f(rand(N, 2))
  assert_unchanged([other, s], before)
  assert issubclass(BatchAxisError, ValueError)


def test_policy_raise_of_an_unnamed_axis_says_the_mapped_axis():
  s = State(jnp.zeros(2))
  f = vmap2(lambda v: setattr(s, 'value', s.value + v) or v, unexpected_out_state_mapping='raise')
  with pytest.raises(BatchAxisError, match='differs across the mapped axis, but'):
    f(rand(N, 2))
  with pytest.raises(ValueError, match='its value differs across the mapped axis; map it'):
    vmap2(lambda v: v, out_axes=None)(rand(N, 2))


def test_policy_auto_gathers_a_write_only_state_silently(no_warnings):
  s = ShortTermState(jnp.zeros(5))      # its old value is never read
  x = rand(N, 2)
  _write_per_lane(s, x, 'auto')
  assert s.value.shape == (N, 2)
  close(s.value, np.asarray(x) * 3.0)


def test_policy_auto_feeds_a_read_then_written_state_per_device(no_warnings):
  buf = ShortTermState(rand(N, 3))      # size N along axis 0: fed lane by lane
  b0 = buf.value
  x = rand(N, 3)

  def step(v):
    buf.value = buf.value * 2.0 + v
    return buf.value.sum()

  out = pmap2(step, axis_name='i')(x)
  want_buf = jax.vmap(lambda b, v: b * 2.0 + v)(b0, x)
  close(buf.value, want_buf)
  close(out, np.asarray(want_buf).sum(1))
  assert buf.value.shape == (N, 3)


def test_policy_auto_buffer_gathered_once_is_fed_on_the_next_call():
  buf = ShortTermState(jnp.zeros(3))    # size 3 != N along axis 0: gathered on the first call
  x = rand(N, 3)

  def step(v):
    buf.value = buf.value + v
    return v

  f = pmap2(step, axis_name='i')
  with pytest.warns(UserWarning, match='ShortTermState'):
    f(x)
  assert buf.value.shape == (N, 3)
  close(buf.value, x)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    f(x)
    f(x)
  assert buf.value.shape == (N, 3)
  close(buf.value, np.asarray(x) * 3)


def test_policy_auto_warns_once_per_state():
  buf = ShortTermState(jnp.zeros(3))
  x = rand(N, 3)

  def step(v):
    buf.value = buf.value + v
    return v

  f = pmap2(step, axis_name='i')
  with pytest.warns(UserWarning):
    f(x)
  close(buf.value, x)
  buf.value = jnp.zeros(3)              # the same situation again: no second warning
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    f(x * 2)
  close(buf.value, np.asarray(x) * 2)


def test_unknown_policy_is_a_value_error():
  with pytest.raises(ValueError, match='unexpected_out_state_mapping'):
    pmap2(lambda x: x, axis_name='i', unexpected_out_state_mapping='gather')


# --- reads ------------------------------------------------------------------------------------

def test_unselected_state_is_broadcast_to_every_lane(no_warnings):
  w = ParamState(rand(N, 3))            # size N, but not selected: every lane sees all of it
  x = rand(N)

  def step(v):
    return w.value * v, w.value.shape[0]

  seen, rows = pmap2(step, axis_name='i', out_axes=(0, None))(x)
  assert rows == N
  close(seen, np.asarray(x)[:, None, None] * np.asarray(w.value)[None])
  assert w.value.shape == (N, 3)


def _probe(p, q):
  """A body that shows what each lane sees of `p` and `q`."""
  def step(v):
    return p.value + v, q.value + v
  return step


@pytest.mark.parametrize('selector', ['type', 'state', 'list', 'dict'])
def test_state_in_axes_selectors(selector, no_warnings):
  p = ParamState(rand(N, 3))
  q = State(rand(N, 3))
  x = rand(N)
  sel = {'type': ParamState, 'state': p, 'list': [p], 'dict': {0: p}}[selector]
  got_p, got_q = pmap2(_probe(p, q), axis_name='i', state_in_axes=sel)(x)
  xs = np.asarray(x)
  close(got_p, np.asarray(p.value) + xs[:, None])                 # mapped: one row per lane
  close(got_q, np.asarray(q.value)[None] + xs[:, None, None])     # broadcast: all rows


def test_state_in_axes_list_of_states_maps_each(no_warnings):
  p = ParamState(rand(N, 3))
  q = State(rand(N, 3))
  x = rand(N)
  got_p, got_q = pmap2(_probe(p, q), axis_name='i', state_in_axes=[p, q])(x)
  close(got_p, np.asarray(p.value) + np.asarray(x)[:, None])
  close(got_q, np.asarray(q.value) + np.asarray(x)[:, None])


def test_state_in_axes_at_axis_1(no_warnings):
  p = ParamState(rand(3, N))
  x = rand(N)
  out = pmap2(lambda v: p.value * v, axis_name='i', state_in_axes={1: p})(x)
  close(out, np.asarray(p.value).T * np.asarray(x)[:, None])


def test_state_in_axes_on_a_pytree_valued_state():
  t = State({'a': rand(N, 3), 'b': rand(N)})
  x = rand(N)
  out = pmap2(lambda v: t.value['a'].sum() * v + t.value['b'], axis_name='i',
              state_in_axes={0: t})(x)
  close(out, np.asarray(t.value['a']).sum(1) * np.asarray(x) + np.asarray(t.value['b']))


def test_state_out_axes_on_a_pytree_valued_state():
  u = State({'a': jnp.zeros(3)})

  def step(v):
    u.value = {'a': u.value['a'] + v}
    return v
  x = rand(N, 3)
  pmap2(step, axis_name='i', state_out_axes={1: u})(x)
  close(u.value['a'], np.asarray(x).T)
  assert u.value['a'].sharding.spec == P(None, 'i')


class Net(meshstate.nn.Module):
  def __init__(self):
    super().__init__()
    self.weight = ParamState(rand(N, 3))
    self.bias = ParamState(rand(3))

  def __call__(self, x):
    return self.weight.value * x + self.bias.value

  def forward(self, x):
    return self(x)


@pytest.mark.parametrize('bound', [False, True], ids=['module', 'method'])
def test_path_contains_selects_module_states_by_name(bound, no_warnings):
  net = Net()
  x = rand(N)
  fn = net.forward if bound else net
  out = pmap2(fn, axis_name='i', state_in_axes={0: PathContains('weight')})(x)
  close(out, np.asarray(net.weight.value) * np.asarray(x)[:, None] + np.asarray(net.bias.value))


# --- random states ----------------------------------------------------------------------------

def _draw(rs):
  def step(v):
    return v + jax.random.normal(rs.split_key(), (2,))
  return step


def test_random_state_draws_differ_per_device_and_key_advances_once(no_warnings):
  rs = RandomState(0)
  old = rs.value
  out = pmap2(_draw(rs), axis_name='i')(jnp.zeros(N))
  assert out.shape == (N, 2)
  assert len({tuple(np.asarray(r).round(6)) for r in out}) == N
  np.testing.assert_array_equal(rs.value, jax.random.split(old)[0])
  assert rs.value.shape == old.shape and rs.value.dtype == old.dtype


def test_random_state_is_reproducible_from_the_seed():
  a = pmap2(_draw(RandomState(0)), axis_name='i')(jnp.zeros(N))
  b = pmap2(_draw(RandomState(0)), axis_name='i')(jnp.zeros(N))
  np.testing.assert_array_equal(a, b)
  rs = RandomState(0)
  f = pmap2(_draw(rs), axis_name='i')
  first, second = f(jnp.zeros(N)), f(jnp.zeros(N))
  np.testing.assert_array_equal(first, a)
  assert not np.allclose(first, second), 'the second call must draw fresh numbers'


def test_default_random_state_advances_once_per_call():
  meshstate.random.seed(3)
  old = meshstate.random.DEFAULT.value
  f = pmap2(lambda v: v + meshstate.random.normal(size=(2,)), axis_name='i')
  out = f(jnp.zeros(N))
  assert len({tuple(np.asarray(r).round(6)) for r in out}) == N
  np.testing.assert_array_equal(meshstate.random.DEFAULT.value, jax.random.split(old)[0])


def test_failed_call_leaves_key_and_states_unchanged():
  rs = RandomState(5)
  s = State(jnp.arange(3.0))
  before = snapshot(rs, s)

  def step(v):
    s.value = s.value + lax.psum(v, 'i')
    v = v + jax.random.uniform(rs.split_key())
    raise RuntimeError('boom')

  f = pmap2(step, axis_name='i')
  for _ in range(2):
    with pytest.raises(RuntimeError, match='boom'):
      f(jnp.zeros(N))
    assert_unchanged([rs, s], before)


def test_failure_on_a_later_call_keeps_the_last_good_values():
  rs = RandomState(5)
  s = State(jnp.zeros(()))

  def step(v):
    if v.shape == (2,):
      raise RuntimeError('bad shape')
    s.value = s.value + lax.psum(v.sum(), 'i')
    return v + jax.random.uniform(rs.split_key())

  f = pmap2(step, axis_name='i')
  f(jnp.ones((N, 3)))
  good = snapshot(rs, s)
  with pytest.raises(RuntimeError, match='bad shape'):
    f(jnp.ones((N, 2)))
  assert_unchanged([rs, s], good)
  close(s.value, 3.0 * N)


def test_failure_while_building_the_program_is_atomic(monkeypatch):
  # discovery succeeds, the second (program) trace raises: nothing may leak out of either.
  # The discovery trace is not lifted here, so the program is a second trace of the body (as
  # on meshes with Explicit axes).
  monkeypatch.setattr(_engine.Reader, 'program', lambda self, *a, **k: None)
  rs = RandomState(2)
  s = State(jnp.zeros(3))
  before = snapshot(rs, s)
  runs = []
  add = meshstate.transform.jit(lambda total: s.value + total)

  def step(v):
    runs.append(1)
    s.value = add(lax.psum(v, 'i'))
    v = v + jax.random.uniform(rs.split_key())
    if len(runs) == 2:
      raise RuntimeError('second trace')
    return v

  with pytest.raises(RuntimeError, match='second trace'):
    pmap2(step, axis_name='i')(jnp.ones((N, 3)))
  assert_unchanged([rs, s], before)


def test_failure_of_pmap2_inside_meshstate_jit_is_atomic():
  s = State(jnp.arange(3.0))
  before = snapshot(s)

  def bad(v):
    s.value = s.value + lax.psum(v, 'i')
    raise KeyError('inner')

  inner = pmap2(bad, axis_name='i')

  @meshstate.transform.jit
  def outer(v):
    s.value = s.value + 1
    return inner(v)

  with pytest.raises(KeyError, match='inner'):
    outer(jnp.ones((N, 3)))
  assert_unchanged([s], before)


def test_raw_jax_jit_around_a_stateful_pmap2_leaves_no_tracer():
  s = State(jnp.zeros(()))

  def step(v):
    s.value = s.value + lax.psum(v, 'i')
    return v * 2

  f = pmap2(step, axis_name='i')
  try:
    jax.jit(f)(jnp.ones(N))
  except Exception as err:  # the SPEC's "clear error"
    assert 'meshstate.transform.jit' in str(err)
  no_tracer(s)
  np.testing.assert_array_equal(s.value, 0.0)


def test_raw_jax_jit_around_a_state_reading_pmap2_leaves_no_tracer():
  w = ParamState(rand(3))
  w0 = np.asarray(w.value)
  x = rand(N, 3)
  out = jax.jit(pmap2(lambda v: v * w.value, axis_name='i'))(x)
  close(out, np.asarray(x) * w0)
  no_tracer(w)
  close(w.value, w0)


def test_jax_grad_through_a_state_reading_pmap2():
  w = ParamState(rand(3))
  f = pmap2(lambda v: jnp.sin(v * w.value), axis_name='i')
  x = rand(N, 3)
  g = jax.grad(lambda v: f(v).sum())(x)
  close(g, np.cos(np.asarray(x) * np.asarray(w.value)) * np.asarray(w.value))
  no_tracer(w)


# --- caching ----------------------------------------------------------------------------------

def _count_calls(total, calls=5):
  runs = []
  x = rand(N, 3)

  def step(v):
    runs.append(1)
    total.value = total.value + lax.psum(v, 'i')
    return v * 2

  f = pmap2(step, axis_name='i')
  f(x)
  first = len(runs)
  assert 1 <= first <= 2
  for _ in range(calls - 1):
    out = f(x)
  close(out, np.asarray(x) * 2)
  close(total.value, np.asarray(x).sum(0) * calls)
  return f, runs, first


def test_body_runs_on_the_first_call_only_for_laid_out_states():
  total = State(mesh_sharded(jnp.zeros(3), P()))    # already laid out as pmap2 writes it
  f, runs, first = _count_calls(total)
  assert len(runs) == first

  total.value = jnp.ones(4)        # a new state shape retraces
  y = rand(N, 4)
  f(y)
  assert len(runs) > first
  close(total.value, 1 + np.asarray(y).sum(0))


def test_body_runs_on_the_first_call_only():
  total = State(jnp.zeros(3))
  f, runs, first = _count_calls(total)
  assert len(runs) == first



@pytest.mark.parametrize('kind', ['pmap2 donated', 'pmap2', 'shard_map'])
def test_a_step_on_one_device_compiles_once(kind, caplog):
  # On a one-device mesh a state made on that device is laid out as the program reads it, but
  # typed without the mesh; passed as it was, its second call compiled the program again.
  w, count = ParamState(jnp.zeros((1, 4))), State(jnp.zeros(()))

  def step(x):
    w.value = w.value + x
    count.value = count.value + 1
    return x * 2
  one = jax.devices()[:1]
  if kind == 'shard_map':
    f = meshstate.transform.shard_map(step, Mesh(np.array(one), ('i',)), P('i'), P('i'),
                                      state_in_specs={w: P('i')}, state_out_specs={w: P('i')})
  else:
    f = pmap2(step, axis_name='i', devices=one, state_in_axes={0: w}, state_out_axes={0: w},
              donate_states=kind == 'pmap2 donated')
  x = jnp.ones((1, 4))
  with jax.log_compiles(), caplog.at_level('WARNING'):
    outs = [f(x) for _ in range(3)]
  compiles = [r for r in caplog.records if 'Compiling jit' in r.getMessage()
              and 'float32[1,4]' in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
  close(outs[-1], 2 * np.ones((1, 4)))
  close(w.value, 3 * np.ones((1, 4)))
  assert float(count.value) == 3.0


def test_states_of_many_shapes_made_on_one_device_go_onto_the_mesh_without_a_compile_each(
    caplog):
  # JAX splits a one-device array by a slicing program compiled per shape and dtype (0.1-0.3 s
  # each); a first call over a model's parameters paid one per shape. Shapes no other test uses.
  ws = [ParamState(jnp.asarray(rand(N, k))) for k in (37, 41)]
  ws.append(ParamState({'b': jnp.arange(N * 43, dtype=jnp.int32).reshape(N, 43),
                        'h': jnp.asarray(rand(N, 47)).astype(jnp.bfloat16)}))
  weak = State(jnp.broadcast_to(jnp.asarray(0.5), (N, 53)))   # weakly typed, only read
  count = State(jnp.asarray(0.0))
  rng = RandomState(7)
  before = [jax.tree.map(np.asarray, w.value) for w in ws]
  assert jax.typeof(weak.value).weak_type

  def step(x):
    for w in ws:
      w.value = jax.tree.map(lambda v: v + x.astype(v.dtype), w.value)
    count.value = count.value + 1
    return x + rng.uniform() + weak.value.sum()

  f = pmap2(step, axis_name='i', state_in_axes={0: [*ws, weak]}, state_out_axes={0: ws})
  mesh = Mesh(np.array(jax.devices()), ('i',))
  x = jax.device_put(jnp.arange(N, dtype=jnp.float32), NamedSharding(mesh, P('i')))
  with jax.log_compiles(), caplog.at_level('WARNING'):
    outs = [f(x), f(x)]
  compiles = [r.getMessage() for r in caplog.records if 'Compiling' in r.getMessage()]
  # The step's program, and a slicing program for the weakly typed state only (a copy through
  # the host would lose its weak type), none per other state's shape.
  per_shape = [m[:90] for m in compiles if 'jit(_multi_slice)' not in m or f'[{N},53]' not in m]
  assert len(per_shape) == 1 and 'jit(_multi_slice)' not in per_shape[0], per_shape
  for w, old in zip(ws, before):
    for got, was in zip(jax.tree.leaves(w.value), jax.tree.leaves(old)):
      lane = np.arange(N).astype(was.dtype)[:, None]
      close(np.asarray(got, np.float32), (was + lane + lane).astype(np.float32))
      assert got.dtype == was.dtype and got.sharding.spec[0] == 'i'
  assert jax.typeof(weak.value).weak_type and weak.value.sharding.spec[0] == 'i'
  assert float(count.value) == 2.0
  draws = np.asarray(outs[0]) - np.arange(N) - 0.5 * 53
  assert ((draws > -1e-4) & (draws < 1 + 1e-4)).all() and len(np.unique(draws.round(4))) == N


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_vmap2_over_a_batch_on_a_mesh_compiles_once(kind, caplog):
  # The states go onto the batch's mesh before the first call, laid out as the program leaves
  # them: before, the second call compiled again for where the first call had put them.
  devices = np.array(jax.devices())
  mesh = (Mesh(devices, ('i',)) if kind == 'Mesh' else
          Mesh(devices, ('i',), axis_types=(jax.sharding.AxisType.Explicit,)))
  w, count, rng = ParamState(jnp.zeros((N, 3))), State(jnp.zeros(())), RandomState(1)

  def step(v):
    w.value = w.value + v
    count.value = count.value + 1
    return v.sum() + rng.uniform()
  f = vmap2(step, axis_name='i', state_in_axes={0: w}, state_out_axes={0: w})
  x = jax.device_put(jnp.ones((N, 3)), NamedSharding(mesh, P('i')))
  with jax.log_compiles(), caplog.at_level('WARNING'):
    outs = [f(x) for _ in range(3)]
  compiles = [r for r in caplog.records if 'Compiling jit' in r.getMessage()
              and re.search(rf'float32\[{N}(@i)?,3\]', r.getMessage())]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
  close(w.value, 3 * np.ones((N, 3)))
  assert float(count.value) == 3.0 and w.value.sharding.spec[0] == 'i'
  draws = np.asarray(outs[0]) - 3
  assert ((draws >= 0) & (draws < 1)).all() and len(np.unique(draws.round(5))) == N


@pytest.mark.parametrize('mapped', [True, False])
def test_vmap2_of_a_plain_batch_and_states_on_an_explicit_mesh_compiles_once(mapped, caplog):
  # The program runs under the mesh of the typed state, and leaves the states made on no mesh
  # (a counter, a RandomState) there: they go there before the first call, as its outputs are.
  mesh = jax.make_mesh((N,), ('i',))
  on_mesh = NamedSharding(mesh, P('i') if mapped else P())
  w = ParamState(jax.device_put(jnp.zeros((N, 3)) if mapped else jnp.zeros(3), on_mesh))
  count, rng = State(jnp.zeros(())), RandomState(1)

  def step(v):
    w.value = w.value + v if mapped else w.value + lax.psum(v.sum(), 'i')
    count.value = count.value + 1
    return v.sum() + rng.uniform()
  axes = {0: ParamState} if mapped else {}
  f = vmap2(step, axis_name='i', state_in_axes=axes, state_out_axes=axes)
  x = jnp.ones((N, 3))   # on no mesh
  with jax.log_compiles(), caplog.at_level('WARNING'):
    outs = [f(x) for _ in range(3)]
  compiles = [r for r in caplog.records if 'Compiling jit' in r.getMessage()
              and re.search(rf'float32\[{N}(@i)?,3\]', r.getMessage())]
  assert len(compiles) == 1, [r.getMessage()[:120] for r in compiles]
  assert f.cache_info().misses == 1
  close(w.value, 3 * np.ones((N, 3)) if mapped else 3 * N * 3 * np.ones(3))
  assert float(count.value) == 3.0 and w.value.sharding.is_equivalent_to(on_mesh, w.value.ndim)
  draws = np.asarray(outs[0]) - 3
  assert ((draws >= 0) & (draws < 1)).all() and len(np.unique(draws.round(5))) == N


# --- errors leave states alone ----------------------------------------------------------------

def _writer():
  s = State(jnp.arange(4.0))

  def step(*args, **kwargs):
    s.value = s.value + 1.0
    return args[0]
  return s, step


def _call_error(make, call, exc=ValueError, match=None):
  s, step = _writer()
  before = snapshot(s)
  with pytest.raises(exc, match=match):
    call(make(step))
  assert_unchanged([s], before)


def test_in_axes_tuple_of_wrong_length():
  _call_error(lambda f: pmap2(f, axis_name='i', in_axes=(0, None)),
              lambda g: g(rand(N)), match='in_axes')


def test_mapped_sizes_that_disagree_list_both():
  s, step = _writer()
  with pytest.raises(ValueError) as info:
    pmap2(step, axis_name='i')(rand(N), rand(4))
  msg = str(info.value)
  assert str(N) in msg and '4' in msg
  assert 'args[0]' in msg and 'args[1]' in msg
  np.testing.assert_array_equal(s.value, np.arange(4.0))


def test_state_size_disagreeing_with_the_arguments():
  h = HiddenState(rand(N, 3))
  before = snapshot(h)

  def step(v):
    h.value = h.value + v.sum()
    return v
  with pytest.raises(ValueError) as info:
    pmap2(step, axis_name='i', state_in_axes={0: h}, state_out_axes={0: h})(rand(4))
  msg = str(info.value)
  assert str(N) in msg and '4' in msg and 'HiddenState' in msg
  assert_unchanged([h], before)


class Cell(meshstate.nn.Module):
  def __init__(self):
    super().__init__()
    self.h = HiddenState(rand(N, 3))

  def __call__(self):
    self.h.value = self.h.value * 2
    return self.h.value.sum()


def test_mapped_size_from_a_declared_module_state(no_warnings):
  cell = Cell()
  h0 = np.asarray(cell.h.value)
  out = pmap2(cell, axis_name='i', state_in_axes={0: HiddenState},
              state_out_axes={0: HiddenState})()
  close(out, (h0 * 2).sum(1))
  close(cell.h.value, h0 * 2)
  assert cell.h.value.sharding.spec == P('i')


def test_mapped_size_from_a_declared_closed_over_state():
  h = HiddenState(rand(N, 3))
  h0 = np.asarray(h.value)

  def step():
    h.value = h.value * 2
    return h.value.sum()
  out = pmap2(step, axis_name='i', state_in_axes={0: h}, state_out_axes={0: h})()
  close(out, (h0 * 2).sum(1))
  close(h.value, h0 * 2)


def test_state_axis_out_of_range():
  s = State(rand(N, 2))
  before = snapshot(s)

  def step(v):
    s.value = s.value * 2
    return v
  with pytest.raises(ValueError, match='axis'):
    pmap2(step, axis_name='i', state_in_axes={3: s}, state_out_axes={3: s})(rand(N))
  assert_unchanged([s], before)


def test_state_out_axis_out_of_range():
  s = State(jnp.zeros(2))
  before = snapshot(s)

  def step(v):
    s.value = v
    return v
  with pytest.raises(ValueError, match='state_out_axes'):
    pmap2(step, axis_name='i', state_out_axes={5: s})(rand(N, 2))
  assert_unchanged([s], before)


def test_unhashable_static_argument():
  _call_error(lambda f: pmap2(f, axis_name='i', static_broadcasted_argnums=1),
              lambda g: g(rand(N), [1, 2]), match='hashable')


def test_overlapping_static_and_donated():
  with pytest.raises(ValueError, match='static'):
    pmap2(lambda x, n: x, axis_name='i', static_broadcasted_argnums=1, donate_argnums=1)


def test_more_lanes_than_devices_not_divisible():
  s, step = _writer()
  with pytest.raises(ValueError) as info:
    pmap2(step, axis_name='i')(rand(N + 4))
  assert str(N + 4) in str(info.value) and str(N) in str(info.value)
  np.testing.assert_array_equal(s.value, np.arange(4.0))


def test_more_lanes_than_devices_multiple():
  total = State(jnp.zeros(()))
  x = rand(2 * N)

  def step(v):
    total.value = total.value + lax.psum(v, 'i')
    return v - lax.pmean(v, 'i') + lax.axis_index('i')

  out = pmap2(step, axis_name='i')(x)
  close(out, np.asarray(x) - np.asarray(x).mean() + np.arange(2 * N))
  close(total.value, np.asarray(x).sum())


# --- composition and donation -----------------------------------------------------------------

def test_pmap2_inside_meshstate_jit_updates_states():
  total = State(jnp.zeros(3))
  h = HiddenState(jnp.zeros((N, 3)))
  x = rand(N, 3)

  inner = pmap2(lambda v: _inner_step(total, h, v), axis_name='i',
                state_in_axes={0: h}, state_out_axes={0: h})

  @meshstate.transform.jit
  def outer(v):
    return inner(v) + 1.0

  out = outer(x)
  close(out, np.asarray(x) * 2 + 1)
  close(total.value, np.asarray(x).sum(0))
  close(h.value, x)
  no_tracer(total, h)
  outer(x)
  close(total.value, 2 * np.asarray(x).sum(0))
  close(h.value, np.asarray(x) * 2)


def _inner_step(total, h, v):
  total.value = total.value + lax.psum(v, 'i')
  h.value = h.value + v
  return v * 2


def test_donate_states_deletes_the_old_buffer():
  h = HiddenState(mesh_sharded(rand(N, 3), P('i')))
  old = h.value
  want = np.asarray(old) * 2
  f = pmap2(lambda v: _double(h, v), axis_name='i', state_in_axes=h, state_out_axes=h,
            donate_states=True)
  f(jnp.zeros(N))
  close(h.value, want)
  assert old.is_deleted()
  assert not h.value.is_deleted()


def _double(h, v):
  h.value = h.value * 2 + v
  return v


def test_custom_mapping_fn_jax_pmap_donates_the_first_argument():
  total = State(jnp.zeros(3))
  x = jax.pmap(lambda v: v * 1.0)(rand(N, 3))   # laid out the way jax.pmap wants
  xs = np.asarray(x)

  def step(v, w):
    total.value = total.value + lax.psum(v * w, 'i')
    return v + w

  f = StatefulMapping(step, in_axes=(0, None), axis_name='i',
                      mapping_fn=lambda f, *a, **kw: jax.pmap(f, *a, donate_argnums=(0,), **kw))
  out = f(x, jnp.float32(2.0))
  close(out, xs + 2)
  close(total.value, (xs * 2).sum(0))
  assert x.is_deleted()
