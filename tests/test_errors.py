"""Errors name the argument, state or axis at fault and say what to do; tracebacks show the
user's frames, not meshstate's."""
import contextlib
import os
import traceback
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import meshstate
from meshstate import State
from meshstate.transform import StatefulMapping, pmap2

from helpers import N

PACKAGE = os.path.dirname(meshstate.__file__)


def test_nested_pmap2_with_the_same_axis_name():
  inner = pmap2(lambda y: lax.psum(y, 'i'), axis_name='i')
  with pytest.raises(ValueError, match=r"Nested pmap2 calls both use axis_name 'i'.*another"):
    pmap2(lambda x: inner(x), axis_name='i')(jnp.ones((2, N // 2)))


def test_mapping_fn_that_is_not_a_function():
  with pytest.raises(TypeError, match='mapping_fn must be a function called like jax.vmap'):
    StatefulMapping(lambda x: x, mapping_fn=3)


def test_mapping_fn_that_returns_no_function():
  f = StatefulMapping(lambda x: x, mapping_fn=lambda fun, **kw: 3)
  with pytest.raises(TypeError, match='mapping_fn returned 3, not a function'):
    f(jnp.ones(2))


def test_state_errors_use_its_name():
  s = State(jnp.ones((N, 3)), name='hidden')
  with pytest.raises(ValueError, match=r"state_in_axes for State 'hidden' \(shape \(8, 3\)\)"):
    pmap2(lambda x: s.value + x, axis_name='i', state_in_axes={3: s})(jnp.ones(N))


def test_out_of_range_state_out_axis_reports_the_written_shape():
  acc = State(jnp.ones(3), name='acc')

  def write(x):
    acc.value = x * jnp.ones((2, 3))
    return x

  with pytest.raises(ValueError, match=r"state_out_axes for State 'acc'.*axis 5 is out of range "
                                       r"for a value of shape \(2, 3\) once the mapped axis"):
    pmap2(write, axis_name='i', state_out_axes={5: acc})(jnp.ones(N))
  assert acc.value.shape == (3,)


def test_arguments_are_spelled_one_way_everywhere():
  f = pmap2(lambda a, b: a, axis_name='i', in_axes=(0, 2))
  with pytest.raises(ValueError, match=r'in_axes for args\[1\]: axis 2'):
    f(jnp.ones(N), jnp.ones((N, 2)))
  g = pmap2(lambda a, b: a, axis_name='i')
  with pytest.raises(ValueError, match=r'size 4: args\[1\]'):
    g(jnp.ones(N), jnp.ones((4, 2)))


def test_state_in_axes_naming_an_unread_state_warns_once_per_signature():
  unused = State(jnp.ones((N, 3)), name='unused')
  f = pmap2(lambda x: x + 1, axis_name='i', state_in_axes={0: unused})
  with pytest.warns(UserWarning, match=r"names State 'unused'.*does not read"):
    f(jnp.ones(N))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    f(jnp.ones(N))   # cached: no second warning


def test_python_value_written_into_a_state_is_kept_as_static():
  mode = State(jnp.zeros(()), name='mode')

  def step(x):
    mode.value = 'eval'
    return x

  pmap2(step, axis_name='i')(jnp.ones(N))
  assert mode.value == 'eval'


def _user_step(x):
  return x @ jnp.ones((5, 5))   # a shape error in the user's own code


def test_error_in_user_code_shows_user_frames_not_meshstates():
  s = State(jnp.zeros(()))

  def step(x):
    s.value = s.value + 1
    return _user_step(x)

  with pytest.raises(TypeError) as err:
    pmap2(step, axis_name='i')(jnp.ones((N, 3)))
  files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
  assert any(f == __file__ for f in files)
  assert not any(f.startswith(PACKAGE) for f in files), files
  assert float(s.value) == 0.0


def _cached_accumulator():
  """A pmap2 step adding its argument into a state, called twice: it now calls its program
  directly. Returns the mapping and the state."""
  s = State(jnp.zeros(N))

  def step(x):
    s.value = s.value + x
    return x

  f = pmap2(step, axis_name='i', state_in_axes={0: State}, state_out_axes={0: State})
  f(jnp.ones(N))
  f(jnp.ones(N))
  return f, s


@contextlib.contextmanager
def _filtering(mode):
  jax.config.update('jax_traceback_filtering', mode)
  try:
    yield
  finally:
    jax.config.update('jax_traceback_filtering', 'auto')


@pytest.mark.parametrize('filtering', ['auto', 'off'])
def test_errors_of_a_cached_mapping_hide_meshstates_frames_unless_filtering_is_off(filtering):
  f, s = _cached_accumulator()
  with _filtering(filtering):
    with pytest.raises(TypeError, match=r'argument args\[0\] is a str, not an array') as bad_arg:
      f('not an array')
    with pytest.raises(meshstate.StateTraceError) as traced_write:
      jax.jit(lambda x: f(x))(jnp.ones(N))   # a raw JAX transform around a state-writing call
  for err in (bad_arg, traced_write):
    files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
    assert files[0] == __file__
    assert any(f.startswith(PACKAGE) for f in files) == (filtering == 'off'), files
  assert float(s.value[0]) == 2.0


def _filterings(err):
  """How many times JAX's traceback filter handled `err`: each adds a note (quiet mode) or an
  UnfilteredStackTrace cause."""
  notes = sum('removed its internal frames' in n for n in getattr(err, '__notes__', []))
  causes, cause = 0, err.__cause__
  while cause is not None:
    causes += type(cause).__name__ == 'UnfilteredStackTrace'
    cause = cause.__cause__
  return notes + causes


@pytest.mark.parametrize('call', ['first', 'cached'])
def test_an_error_in_the_users_step_is_filtered_once(call):
  fail = State(False)

  def step(x):
    return _user_step(x) if fail.value else x

  f = pmap2(step, axis_name='i')
  if call == 'cached':
    f(jnp.ones((N, 5)))
    f(jnp.ones((N, 5)))
  fail.value = True
  with pytest.raises(TypeError) as err:
    f(jnp.ones((N, 3)))
  assert _filterings(err.value) == 1
  files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
  assert files[0] == __file__ and not any(f.startswith(PACKAGE) for f in files), files


def _device_lost(*slots):
  raise RuntimeError('device lost')   # as a program's dispatch can fail, below any JAX frame


@pytest.mark.parametrize('filtering', ['auto', 'off'])
def test_an_error_from_a_cached_calls_program_is_filtered_once(filtering, monkeypatch):
  f, s = _cached_accumulator()
  monkeypatch.setattr(f._direct, 'fn', _device_lost)   # private: the program a cached call runs
  with _filtering(filtering), pytest.raises(RuntimeError, match='device lost') as err:
    f(jnp.ones(N))
  files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
  assert files[0] == __file__ and files[-1] == __file__   # the call, then _device_lost
  assert any(f.startswith(PACKAGE) for f in files) == (filtering == 'off'), files
  assert _filterings(err.value) == (filtering != 'off')
  assert float(s.value[0]) == 2.0


def test_traceback_filtering_off_shows_meshstates_frames():
  with _filtering('off'), pytest.raises(TypeError) as err:
    pmap2(_user_step, axis_name='i')(jnp.ones((N, 3)))
  files = [f.filename for f in traceback.extract_tb(err.value.__traceback__)]
  assert any(f.startswith(PACKAGE) for f in files)
