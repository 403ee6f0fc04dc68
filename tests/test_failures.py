"""Failure injection: an exception at any stage of a call leaves states, key and cache as before.

Each stage of a call is made to raise once (an ordinary exception, then `KeyboardInterrupt`):
the signature, discovery, building the program, running it, writing the states back, and
advancing the random key. Afterwards every state and the global key hold their old values,
the cache holds what it held, and the next call works.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshstate
from meshstate import ParamState, ShortTermState
from meshstate.random import RandomState
from meshstate.transform import StatefulMapping, _engine, pmap2

from helpers import N, close, no_tracer


class Injected(Exception):
  pass


def _model():
  w = ParamState(jnp.ones(3))
  h = ShortTermState(jnp.zeros((N, 3)))
  rng = RandomState(7)

  def step(x):
    noise = rng.uniform(size=(3,))
    w.value = w.value + jax.lax.pmean(x, 'i')
    h.value = h.value + x + noise
    return x * 2 + meshstate.random.normal(size=(3,))

  f = pmap2(step, axis_name='i', state_in_axes={0: h}, state_out_axes={0: h})
  return f, (w, h, rng)


def _snapshot(states):
  return [np.asarray(s.value) for s in (*states, meshstate.random.DEFAULT)]


def _assert_same(states, before):
  after = _snapshot(states)
  no_tracer(*states, meshstate.random.DEFAULT)
  for a, b in zip(after, before):
    np.testing.assert_array_equal(a, b)


def _raise(kind):
  def fail(*args, **kwargs):
    raise kind('injected')
  return fail


# (stage, whether the signature is already cached): discovery and the program are built on
# a first call only; running and writing back happen on every call.
STAGES = [('signature', False), ('signature', True), ('discovery', False), ('program', False),
          ('run', True), ('write-back', True), ('random key', True)]


def _raise_once(kind):
  armed = [True]

  def setattr_(self, name, value):
    if armed[0]:
      armed[0] = False
      raise kind('injected')
    object.__setattr__(self, name, value)
  return setattr_


class _FailingLookup(dict):
  def __init__(self, kind):
    super().__init__()
    self.kind = kind

  def get(self, *args):
    raise self.kind('injected')


class _FailingEntry:
  flat = True   # positional arrays: the direct path goes on to read the states

  def __init__(self, kind):
    self.kind = kind

  @property
  def in_states(self):
    raise self.kind('injected')


def _inject(stage, kind, f, states, monkeypatch):
  """Arrange for `stage` to raise `kind` on the next call; returns an undo function or None."""
  _, h, rng = states
  if stage == 'signature':   # the general path's signature, the fast path's lookup, and the
    # direct path's reading of its entry
    monkeypatch.setattr(f, '_signature', _raise(kind))
    monkeypatch.setattr(f, '_flat', _FailingLookup(kind))
    if f._direct is not None:
      monkeypatch.setattr(f, '_direct', _FailingEntry(kind))
  elif stage == 'discovery':
    monkeypatch.setattr(_engine, 'discover', _raise(kind))
  elif stage == 'program':
    monkeypatch.setattr(f._mapper, 'plan', _raise(kind))
  elif stage == 'run':
    for entry in f._lru:
      monkeypatch.setattr(entry, 'fn', _raise(kind))
  else:   # the store into one state's slot raises, once (restoring it afterwards works)
    target = h if stage == 'write-back' else rng
    flaky = type('Flaky' + type(target).__name__, (type(target),),
                 {'__slots__': (), '__setattr__': _raise_once(kind)})
    monkeypatch.setattr(target, '__class__', flaky)


@pytest.mark.parametrize('kind', [Injected, KeyboardInterrupt])
@pytest.mark.parametrize('stage, warm', STAGES)
def test_failure_at_each_stage_changes_nothing(stage, warm, kind, monkeypatch):
  meshstate.random.seed(0)
  f, states = _model()
  x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
  if warm:
    f(x)
  before = _snapshot(states)
  cached = f.cache_info().currsize
  with monkeypatch.context() as m:
    _inject(stage, kind, f, states, m)
    with pytest.raises(kind):
      f(x)
  _assert_same(states, before)
  assert f.cache_info().currsize == cached
  # the next good call works and does what one call does
  g, fresh = _model()
  for s, v in zip(fresh, before):
    s.value = jnp.asarray(v)
  key = meshstate.random.DEFAULT.value
  out = f(x)
  meshstate.random.DEFAULT.value = key
  want = g(x)
  close(out, want)
  for a, b in zip(states, fresh):
    close(a.value, b.value)


def test_failure_leaves_no_partial_entry_for_the_signature():
  f, states = _model()
  x = jnp.ones((N, 3))
  real = f._mapper.plan
  calls = []

  def fail_once(*a, **k):
    calls.append(1)
    if len(calls) == 1:
      raise Injected('injected')
    return real(*a, **k)

  f._mapper.plan = fail_once
  with pytest.raises(Injected):
    f(x)
  assert f.cache_info().currsize == 0 and isinstance(f, StatefulMapping)
  f(x)
  assert f.cache_info().currsize == 1
