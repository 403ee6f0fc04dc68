import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshstate
from meshstate import HiddenState, LongTermState, ParamState, ShortTermState, State
from meshstate._state import Frame, frames


def test_subclasses_and_names():
  for cls in (ParamState, ShortTermState, LongTermState, HiddenState):
    assert issubclass(cls, State)
    assert cls.__module__ == 'meshstate'
  assert meshstate.StateTraceError.__module__ == 'meshstate'


def test_value_get_set_changes_shape_and_dtype():
  w = ParamState(jnp.ones((8,)))
  assert w.value.shape == (8,) and w.value.dtype == jnp.float32
  w.value = jnp.arange(32, dtype=jnp.int32).reshape(8, 4)
  assert w.value.shape == (8, 4) and w.value.dtype == jnp.int32
  np.testing.assert_array_equal(w.value, np.arange(32).reshape(8, 4))
  w.value = {'a': np.zeros(2), 'b': 3.0}  # any pytree
  assert w.value['b'] == 3.0


def test_storing_a_state_in_a_state_is_rejected():
  w = ParamState(1.0)
  with pytest.raises(TypeError, match='ParamState'):
    w.value = ParamState(2.0)
  assert w.value == 1.0


def test_sharding_and_spec_for_non_arrays():
  s = State(np.zeros((8, 2)))
  assert s.sharding is None
  assert s.spec is None
  assert State(3.0).sharding is None


def test_sharding_and_spec_on_a_mesh():
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ('i',))
  sharding = NamedSharding(mesh, P('i'))
  s = ParamState(jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding))
  assert s.sharding == sharding
  assert isinstance(s.sharding, NamedSharding)
  assert s.spec == P('i')
  s.value = jax.device_put(jnp.zeros((8, 2)), NamedSharding(mesh, P(None, None)))
  assert s.spec == P(None, None)


def test_tracer_write_under_raw_jit_raises_and_keeps_value():
  w = ParamState(jnp.ones(3))
  old = w.value

  @jax.jit
  def step(x):
    w.value = w.value + x
    return w.value

  with pytest.raises(meshstate.StateTraceError, match=r'meshstate\.transform\.jit') as info:
    step(jnp.ones(3))
  assert 'ParamState' in str(info.value)
  assert w.value is old
  assert not isinstance(w.value, jax.core.Tracer)
  np.testing.assert_array_equal(w.value, np.ones(3))


def test_tracer_write_under_grad_raises():
  h = HiddenState(jnp.zeros(()))

  def loss(x):
    h.value = x * 2
    return x ** 2

  with pytest.raises(meshstate.StateTraceError):
    jax.grad(loss)(1.0)
  assert float(h.value) == 0.0


def test_read_under_raw_jit_is_allowed():
  w = ParamState(jnp.full(3, 2.0))
  out = jax.jit(lambda x: w.value * x)(jnp.ones(3))
  np.testing.assert_array_equal(out, np.full(3, 2.0))


def test_frame_records_first_touch_order():
  a, b, c, d = State(1.), State(2.), State(3.), State(4.)
  with Frame() as frame:
    assert frames()[-1] is frame
    _ = b.value
    a.value = 10
    _ = c.value
    _ = b.value  # again: still once
    a.value = 11  # written twice: still once
    c.value = 30  # read then written: in both
    d.value = 40
    _ = d.value  # written then read: write-only
    assert a.value == 11 and d.value == 40
  assert list(frame.touched) == [b, a, c, d]
  assert list(frame.reads) == [b, c]
  assert list(frame.writes) == [a, c, d]
  assert d not in frame.reads
  assert frames() == []


def test_frame_restores_values_on_exit():
  a, b = ParamState(jnp.zeros(2)), ShortTermState('old')
  original = a.value
  with Frame():
    a.value = a.value + 1
    b.value = 'new'
    assert b.value == 'new'
  assert a.value is original
  assert b.value == 'old'


def test_frame_restores_values_on_exception():
  a = State(1)
  with pytest.raises(ZeroDivisionError):
    with Frame():
      a.value = 2
      1 / 0  # noqa: B018  (raises inside the frame)
  assert a.value == 1
  assert frames() == []


def test_frame_view_replaces_read_value():
  a = State(5.)
  seen = []

  def view(state, value):
    seen.append((state, value))
    return value * 100

  with Frame(view) as frame:
    assert a.value == 500
    assert a.value == 500  # the view is applied once, on the first read
  assert seen == [(a, 5)]
  assert list(frame.reads) == [a]
  assert a.value == 5


def test_frame_ignores_states_created_inside():
  outside = State(0)
  with Frame() as frame:
    inner = State(1)
    inner.value = inner.value + 1
    outside.value = inner.value
  assert list(frame.touched) == [outside]
  assert inner.value == 2  # created inside: not restored
  assert outside.value == 0


def test_nested_frames_read_through_parent():
  a, b = State(1.), State(2.)
  with Frame(lambda s, v: v + 10) as outer:
    with Frame(lambda s, v: v * 2) as inner:
      assert frames() == [outer, inner]
      assert a.value == (1 + 10) * 2  # the parent's view first, then the inner one
      b.value = 7  # a write in the inner frame is not seen by the parent
    assert list(inner.reads) == [a]
    assert list(inner.writes) == [b]
    assert list(outer.reads) == [a]  # recorded by the parent through the inner read
    assert list(outer.writes) == []
    assert a.value == 11  # the inner frame restored what the parent showed it
    assert b.value == 2 + 10  # the inner write is gone; the parent's view sees the old value
  assert a.value == 1 and b.value == 2


def test_nested_frame_exception_restores_both():
  a = State('x')
  with pytest.raises(RuntimeError):
    with Frame() as outer:
      a.value = 'outer'
      with Frame():
        a.value = 'inner'
        raise RuntimeError('boom')
  assert a.value == 'x'
  assert frames() == []
  assert list(outer.writes) == [a]
