"""The state-aware `meshstate.transform.jit`: states carried in and out of one compiled program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate import ParamState, State, StateTraceError
from meshstate.transform import jit

from helpers import N, close, no_tracer, rand


def test_reads_and_writes_are_carried():
  w = ParamState(rand(3))
  acc = State(jnp.zeros(3))
  x = rand(3)
  w0 = np.asarray(w.value)

  @jit
  def step(v):
    acc.value = acc.value + v * w.value
    return acc.value.sum()

  out = step(x)
  close(acc.value, np.asarray(x) * w0)
  close(out, (np.asarray(x) * w0).sum())
  step(x)
  close(acc.value, 2 * np.asarray(x) * w0)
  close(w.value, w0)
  no_tracer(w, acc)
  assert isinstance(acc.value, jax.Array)


def test_write_only_state_and_new_state_value():
  out_state = State(jnp.zeros(()))

  @jit
  def step(v):
    out_state.value = {'double': v * 2, 'n': jnp.int32(v.shape[0])}

  x = rand(4)
  step(x)
  close(out_state.value['double'], np.asarray(x) * 2)
  assert int(out_state.value['n']) == 4


def test_repeated_calls_do_not_rerun_the_body_and_new_shapes_retrace():
  runs = []
  s = State(jnp.zeros(3))

  @jit
  def step(v):
    runs.append(1)
    s.value = s.value + v
    return s.value * 2

  x = rand(3)
  step(x)
  first = len(runs)
  assert 1 <= first <= 2
  for _ in range(4):
    out = step(x)
  assert len(runs) == first
  close(s.value, np.asarray(x) * 5)
  close(out, np.asarray(x) * 10)

  s.value = jnp.ones(5)            # a new state shape retraces with the right values
  y = rand(5)
  out = step(y)
  assert len(runs) > first
  close(s.value, 1 + np.asarray(y))
  close(out, 2 + 2 * np.asarray(y))


def test_state_growing_every_call():
  s = State(jnp.ones(1))

  @jit
  def grow():
    s.value = jnp.concatenate([s.value, s.value * 2])
    return s.value.shape[0]

  sizes = [grow() for _ in range(3)]
  assert sizes == [2, 4, 8]
  np.testing.assert_array_equal(s.value, [1, 2, 2, 4, 2, 4, 4, 8])


@pytest.mark.filterwarnings('error::DeprecationWarning')
def test_pytree_valued_states_without_deprecation_warnings():
  s = State({'a': jnp.ones(2), 'b': jnp.zeros(3)})

  @jit
  def step():
    s.value = {'a': s.value['a'] * 2, 'b': s.value['b'] + 1}

  step()
  close(s.value['a'], [2, 2])
  close(s.value['b'], [1, 1, 1])


def test_static_argnums_and_static_argnames():
  runs = []
  s = State(jnp.zeros(2))

  def body(v, n, *, mode='add'):
    runs.append((n, mode))
    s.value = s.value + v * n if mode == 'add' else s.value - v * n
    return n

  step = jit(body, static_argnums=1, static_argnames='mode')
  x = rand(2)
  assert step(x, 3) == 3
  close(s.value, np.asarray(x) * 3)
  step(x, 2, mode='sub')
  close(s.value, np.asarray(x))
  before = len(runs)
  step(x, 3)
  assert len(runs) == before
  close(s.value, np.asarray(x) * 4)
  assert {r for r in runs} == {(3, 'add'), (2, 'sub')}


def _repeat_double(v, n):
  for _ in range(n):          # needs a concrete n
    v = v * 2
  return v


@pytest.mark.parametrize('kw, call', [
    ({'static_argnames': 'n'}, lambda f, x: f(x, 3)),
    ({'static_argnums': 1}, lambda f, x: f(x, n=3)),
], ids=['argnames_positional', 'argnums_keyword'])
def test_static_argument_passed_the_other_way(kw, call):
  x = rand(2)
  want = call(jax.jit(_repeat_double, **kw), x)
  close(call(jit(_repeat_double, **kw), x), want)


def test_unhashable_static_argument():
  step = jit(lambda v, n: v, static_argnums=1)
  with pytest.raises(ValueError, match='hashable'):
    step(rand(2), [1])


def test_non_array_argument_without_static_is_a_type_error():
  step = jit(lambda v, mode: v)
  with pytest.raises(TypeError, match='static'):
    step(rand(2), 'fast')


def test_donate_argnums():
  s = State(jnp.zeros(4))

  step = jit(lambda v, w: _body_donate(s, v, w), donate_argnums=0)
  x, y = rand(4), rand(4)
  want = np.asarray(x) * 2
  close(step(x, y), want)
  assert x.is_deleted()
  assert not y.is_deleted()
  close(s.value, y)


def _body_donate(s, v, w):
  s.value = s.value + w
  return v * 2


def test_donate_states():
  s = State(rand(4))
  old = s.value
  want = np.asarray(old) + 1

  def body():
    s.value = s.value + 1
  jit(body, donate_states=True)()
  close(s.value, want)
  assert old.is_deleted()


@pytest.mark.parametrize('spec', [P('i'), P(None, 'i'), P()])
def test_written_state_keeps_its_sharding(spec):
  mesh = Mesh(np.array(jax.devices()), ('i',))
  sharding = NamedSharding(mesh, spec)
  s = State(jax.device_put(rand(N, N), sharding))
  want = np.asarray(s.value) * 2

  @jit
  def double():
    s.value = s.value * 2

  double()
  close(s.value, want)
  assert isinstance(s.value.sharding, NamedSharding)
  assert s.value.sharding.spec == spec
  assert s.value.sharding.mesh == mesh
  double()
  assert s.value.sharding.spec == spec
  close(s.value, want * 2)


def test_exception_leaves_states_and_default_key_unchanged():
  meshstate.random.seed(11)
  key = np.asarray(meshstate.random.DEFAULT.value)
  s = State(jnp.arange(3.0))

  @jit
  def bad(v):
    s.value = s.value + meshstate.random.normal(size=(3,)) + v
    raise ValueError('inside jit')

  for _ in range(2):
    with pytest.raises(ValueError, match='inside jit'):
      bad(rand(3))
    np.testing.assert_array_equal(meshstate.random.DEFAULT.value, key)
    np.testing.assert_array_equal(s.value, np.arange(3.0))
    no_tracer(s, meshstate.random.DEFAULT)


def test_random_default_advances_like_a_plain_draw():
  meshstate.random.seed(4)
  key = meshstate.random.DEFAULT.value

  @jit
  def draw():
    return meshstate.random.normal(size=(2,))

  a = draw()
  meshstate.random.DEFAULT.value = key
  np.testing.assert_allclose(a, meshstate.random.normal(size=(2,)), rtol=1e-6)
  b = draw()
  assert not np.allclose(a, b)


def test_nested_jit():
  s = State(jnp.zeros(2))
  count = State(jnp.int32(0))

  @jit
  def inner(v):
    s.value = s.value + v
    count.value = count.value + 1
    return s.value

  @jit
  def outer(v):
    a = inner(v)
    b = inner(v * 2)
    return a + b

  x = rand(2)
  out = outer(x)
  close(s.value, np.asarray(x) * 3)
  close(out, np.asarray(x) * 4)
  assert int(count.value) == 2
  outer(x)
  close(s.value, np.asarray(x) * 6)
  assert int(count.value) == 4
  no_tracer(s, count)
  inner(x)                          # still usable on its own
  close(s.value, np.asarray(x) * 7)


def test_raw_jax_jit_writing_a_state_names_meshstate_jit():
  s = State(jnp.zeros(2))

  def body(v):
    s.value = v
    return v

  with pytest.raises(StateTraceError, match='meshstate.transform.jit'):
    jax.jit(body)(rand(2))
  no_tracer(s)
  np.testing.assert_array_equal(s.value, np.zeros(2))


def test_raw_jax_jit_around_meshstate_jit_leaves_no_tracer():
  s = State(jnp.zeros(2))

  @jit
  def step(v):
    s.value = s.value + v
    return v

  try:
    jax.jit(step)(rand(2))
  except Exception as err:  # the SPEC's "clear error"
    assert 'meshstate.transform.jit' in str(err)
  no_tracer(s)
  np.testing.assert_array_equal(s.value, np.zeros(2))


def test_raw_jax_jit_around_a_state_reading_function_works():
  w = ParamState(rand(3))
  f = jit(lambda v: v * w.value)
  x = rand(3)
  close(jax.jit(f)(x), np.asarray(x) * np.asarray(w.value))
  no_tracer(w)


def test_jit_of_stateless_function_matches_jax_jit():
  f = lambda v, w: jnp.tanh(v @ w)  # noqa: E731
  v, w = rand(3, 4), rand(4, 2)
  close(jit(f)(v, w), jax.jit(f)(v, w))
  close(jax.grad(lambda w: jit(f)(v, w).sum())(w), jax.grad(lambda w: f(v, w).sum())(w))
