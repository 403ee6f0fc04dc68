"""Repeated calls hand their values straight to the cached program.

After a call, the next one of the same argument structure (positional arrays, pytrees or
keyword arguments) passes the arguments' leaves and the states' values to the program that
call ran, and leaves comparing their types and shardings to `jax.jit`'s C++
dispatch. A program refuses to be traced for other types than it was built for, and the call
then falls back to the checked path. Each test changes what such a call receives (a state's
shape or sharding, an argument's shape or type, an enclosing raw JAX trace) and compares the
outputs and the states afterwards with a hand-written computation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshstate import ParamState, State, StateTraceError
from meshstate.transform import _engine, jit, pmap2, vmap2

from helpers import N, close, no_tracer, rand


def _accumulator(donate=False):
  """A pmap2 step adding its argument into a per-device state; it counts its traces."""
  acc = ParamState(jnp.zeros((N, 3)))
  calls = State(jnp.zeros(()))
  traces = []

  def step(x):
    traces.append(1)
    acc.value = acc.value + x
    calls.value = calls.value + 1
    return x * 2

  f = pmap2(step, axis_name='i', state_in_axes={0: acc}, state_out_axes={0: acc},
            donate_states=donate)
  return f, acc, calls, traces


def _warm():
  """The accumulator after two calls (the second a direct one), and its argument."""
  f, acc, calls, traces = _accumulator()
  x = rand(N, 3)
  f(x)
  f(x)
  return f, acc, calls, traces, x


@pytest.mark.parametrize('donate', [False, True])
def test_state_replaced_by_another_shape_traces_anew(donate):
  f, acc, calls, traces = _accumulator(donate)
  x = rand(N, 3)
  for _ in range(3):
    close(f(x), x * 2)
  close(acc.value, 3 * x)
  assert len(traces) == 1
  acc.value = jnp.ones((N, 1, 3))   # per device (1, 3) instead of (3,): broadcasts with x
  close(f(x), x * 2)
  close(acc.value, 1 + x[:, None, :])
  assert acc.value.shape == (N, 1, 3) and len(traces) == 2
  close(f(x), x * 2)
  close(acc.value, 1 + 2 * x[:, None, :])
  assert float(calls.value) == 5 and len(traces) == 2


def test_state_replaced_by_another_sharding_is_laid_out_again():
  f, acc, calls, traces, x = _warm()
  sharded = acc.value.sharding
  mesh = Mesh(np.array(jax.devices()), ('i',))
  for value in (jax.device_put(acc.value, NamedSharding(mesh, P())),   # replicated
                jax.device_put(acc.value, jax.devices()[-1])):          # on one device
    before = np.asarray(value)
    acc.value = value
    close(f(x), x * 2)
    close(acc.value, before + np.asarray(x))
    assert acc.value.sharding.is_equivalent_to(sharded, 2)
  assert float(calls.value) == 4 and len(traces) == 1


def test_arguments_alternating_between_shapes_stay_correct():
  total = ParamState(jnp.zeros(N))
  traces = []

  def step(x):
    traces.append(1)
    total.value = total.value + x.sum()
    return x * 2

  f = pmap2(step, axis_name='i', state_in_axes={0: total}, state_out_axes={0: total})
  xs = [rand(N, 3), rand(N, 5)]
  want = np.zeros(N)
  for k in range(24):   # more refusals than the direct path tolerates before it stops trying
    x = xs[k % 2]
    close(f(x), x * 2)
    want += np.asarray(x).sum(axis=1)
    close(total.value, want)
  assert len(traces) == 2


def test_vmap2_follows_a_read_state_replaced_by_another_dtype_or_shape():
  w = State(jnp.ones(3))
  f = vmap2(lambda x: x * w.value, in_axes=0)
  x = rand(4, 3)
  for value in (jnp.full(3, 2.0), jnp.arange(3), jnp.full((1,), 3.0), jnp.ones(3)):
    w.value = value
    for _ in range(2):   # the second call of each is a direct one
      out = f(x)
      close(out, np.asarray(x) * np.asarray(value))
      assert out.dtype == jnp.result_type(x, value)


def test_non_array_argument_after_direct_calls_names_it():
  f, acc, calls, traces, x = _warm()
  before = np.asarray(acc.value)
  with pytest.raises(TypeError, match=r'step: argument args\[0\] is a str, not an array'):
    f('abc')
  close(acc.value, before)
  close(f(x), x * 2)
  close(acc.value, before + np.asarray(x))


def test_raw_jax_jit_around_a_warm_call_raises_and_leaves_the_states():
  f, acc, calls, traces, x = _warm()
  before = np.asarray(acc.value)
  with pytest.raises(StateTraceError, match='meshstate equivalent'):
    jax.jit(f)(x)
  no_tracer(acc, calls)
  close(acc.value, before)
  assert float(calls.value) == 2
  f(x)
  close(acc.value, before + np.asarray(x))


def test_argument_committed_to_one_device_is_moved_onto_the_mesh():
  f, acc, calls, traces = _accumulator()
  x = rand(N, 3)
  one = jax.device_put(x, jax.devices()[0])
  close(f(one), x * 2)
  close(f(x), x * 2)
  close(f(one), x * 2)
  close(acc.value, 3 * np.asarray(x))
  assert float(calls.value) == 3 and len(traces) == 1


def test_wrong_number_of_arguments_after_direct_calls_is_the_functions_error():
  f, acc, calls, traces, x = _warm()
  before = np.asarray(acc.value)
  with pytest.raises(TypeError, match='positional argument'):
    f(x, x)
  close(acc.value, before)
  close(f(x), x * 2)
  assert float(calls.value) == 3


def test_cache_clear_between_direct_calls_traces_again():
  f, acc, calls, traces, x = _warm()
  f.cache_clear()
  close(f(x), x * 2)
  close(acc.value, 3 * np.asarray(x))
  assert len(traces) == 2 and f.cache_info().misses == 1


def test_jit_keeps_the_layout_a_state_was_given_between_direct_calls():
  mesh = Mesh(np.array(jax.devices()), ('i',))
  s = State(jax.device_put(rand(N, N), NamedSharding(mesh, P('i'))))
  traces = []

  @jit
  def double(x):
    traces.append(1)
    s.value = s.value * 2 + x
    return x

  x = jnp.zeros(())
  want = np.asarray(s.value)
  for spec in (P('i'), P('i'), P(None, 'i'), P(None, 'i'), P(), P('i')):
    s.value = jax.device_put(s.value, NamedSharding(mesh, spec))   # same values, resharded
    for _ in range(2):   # the second call of each layout is a direct one
      double(x)
      want = want * 2
      close(s.value, want)
      assert s.value.sharding.spec == spec, (spec, s.value.sharding)
  assert len(traces) == 3   # one program per layout, each kept on its own


def test_jit_state_replaced_by_a_numpy_array_between_direct_calls():
  s = State(jnp.ones(3))
  bump = jit(lambda: setattr(s, 'value', s.value + 1))
  bump()
  bump()
  s.value = np.zeros(3, np.float32)
  bump()
  bump()
  close(s.value, np.full(3, 2.0))
  assert isinstance(s.value, jax.Array)


def test_pytree_and_keyword_arguments_take_the_direct_path(monkeypatch):
  total = ParamState(jnp.zeros(N))
  traces, checked = [], []
  real = _engine.StatefulMapping._checked

  def spy(self, *args, **kwargs):
    checked.append(1)
    return real(self, *args, **kwargs)
  monkeypatch.setattr(_engine.StatefulMapping, '_checked', spy)

  def step(batch, scale=1.0, mask=None):
    traces.append(1)
    v = batch['x'] * scale + batch['y']
    if mask is not None:
      v = v * mask
    total.value = total.value + v.sum()
    return {'v': v}

  f = pmap2(step, axis_name='i', state_in_axes={0: total}, state_out_axes={0: total})
  want = np.zeros(N)
  calls = []
  for k in range(6):   # the same structure: after the first call, none takes the checked path
    batch = {'x': rand(N, 3), 'y': rand(N, 3)}
    calls.append(((batch,), {'scale': jnp.full(N, float(k))}))   # keywords are mapped too
  mask = rand(N, 3)
  calls.append(((calls[0][0][0],), {'scale': jnp.full(N, 2.0), 'mask': mask}))   # another
  calls.append(((calls[1][0][0],), {'scale': jnp.full(N, 3.0)}))   # the first structure again
  for k, (args, kwargs) in enumerate(calls):
    checked.clear()
    out = f(*args, **kwargs)
    b = {key: np.asarray(v) for key, v in args[0].items()}
    v = b['x'] * np.asarray(kwargs['scale'])[:, None] + b['y']
    if 'mask' in kwargs:
      v = v * np.asarray(kwargs['mask'])
    close(out['v'], v)
    want += v.sum(axis=1)
    close(total.value, want)
    assert len(checked) == (k in (0, 6, 7)), k   # a new structure, or a switch back to one
  assert len(traces) == 2
