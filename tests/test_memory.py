"""Memory: cache entries keep no state buffers alive, and the program cache is bounded."""
import gc

import jax
import jax.numpy as jnp
import pytest

from meshstate import State
from meshstate.transform import StatefulMapping, jit, pmap2

from helpers import N


def _live_bytes():
  gc.collect()
  arrays = jax.live_arrays()
  return len(arrays), sum(a.nbytes for a in arrays)


def test_many_shapes_leave_live_arrays_at_the_baseline():
  s = State(jnp.zeros(128 * 1024))   # 512 KiB

  @jit
  def step(x):
    s.value = s.value + x.sum()
    return x

  step(jnp.ones(1))
  count0, bytes0 = _live_bytes()
  for n in range(2, 202):
    step(jnp.ones(n))
  count, nbytes = _live_bytes()
  assert count <= count0 + 1 and nbytes <= bytes0 + 4096, (count0, bytes0, count, nbytes)
  info = step.cache_info()
  assert info.currsize == step.cache_size == StatefulMapping.default_cache_size
  assert info.misses == 201 and info.hits == 0


def test_replaced_state_value_is_not_kept_by_the_cache():
  s = State(jnp.ones(64 * 1024))

  @jit
  def step():
    return s.value.sum()

  step()
  old = s.value
  s.value = jnp.zeros(64 * 1024)
  ref_count = len([a for a in jax.live_arrays() if a is old])
  del old
  gc.collect()
  assert ref_count == 1
  assert not any(a.shape == (64 * 1024,) and float(a[0]) == 1.0 for a in jax.live_arrays())


def test_cache_is_lru_with_a_settable_size_and_info():
  f = pmap2(lambda x: x + 1, axis_name='i')
  f.cache_size = 2
  a, b, c = jnp.ones(N), jnp.ones((N, 2)), jnp.ones((N, 3))
  f(a)
  f(b)
  f(a)          # a is now the most recent: b goes first
  f(c)
  assert f.cache_info().currsize == 2
  misses = f.cache_info().misses
  f(a)
  assert f.cache_info().misses == misses      # still cached
  f(b)
  assert f.cache_info().misses == misses + 1  # was evicted, traced again
  info = f.cache_info()
  assert (info.hits, info.misses) == (2, 4)
  f.cache_clear()
  assert f.cache_info().currsize == 0


@pytest.mark.parametrize('size', [0, -1])
def test_cache_size_below_one_still_keeps_the_program_it_runs(size):
  f = jit(lambda x: x * 2)
  f.cache_size = size
  assert float(f(jnp.float32(2))) == 4.0
  assert f.cache_info().currsize == 1
