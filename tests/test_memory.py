"""Memory: cache entries keep no state buffers alive, and the program cache is bounded."""
import ctypes
import gc
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import meshstate
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


_RSS_ARM = r'''
import collections, ctypes, gc, json, os, sys, weakref
import jax, jax.numpy as jnp, numpy as np
from meshstate import State
from meshstate.transform import StatefulMapping, jit

trim = ctypes.CDLL(None).malloc_trim

def rss_mib():
  gc.collect()
  trim(0)   # hand freed heap pages back, so RSS shows what is still in use
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

s = State(jnp.zeros(128 * 1024))   # 512 KiB
refs = []
if sys.argv[1] == 'meshstate':
  @jit
  def step(x):
    s.value = s.value + x.sum()
    return x

  def call(x):
    step(x)
    refs.append(weakref.ref(next(reversed(step._lru)).fn))   # the newest entry's program
  clear = step.cache_clear
else:   # plain jax.jit: one new function per shape, the last cache_size of them kept alive
  held = collections.deque(maxlen=StatefulMapping.default_cache_size)

  def call(x):
    g = jax.jit(lambda x, v: (x, v + x.sum()))
    _, s.value = g(x, s.value)
    held.append(g)
    refs.append(weakref.ref(g))
  clear = held.clear

call(np.ones(1, np.float32))
call(np.ones(1, np.float32))
refs.clear()
before = rss_mib()
for n in range(2, 202):   # NumPy inputs: jnp.ones(n) would compile (and JAX keep) one more program
  call(np.ones(n, np.float32))
held_mib = rss_mib() - before
clear()
after_mib = rss_mib() - before
print(json.dumps({'held': held_mib, 'after': after_mib, 'programs': len(refs),
                  'alive': sum(r() is not None for r in refs), 'value': float(s.value[0])}))
'''


@pytest.mark.skipif(not sys.platform.startswith('linux') or not hasattr(ctypes.CDLL(None),
                    'malloc_trim'), reason='reads /proc/self/statm and uses glibc malloc_trim')
def test_many_shapes_leave_rss_at_plain_jax_jits_baseline():
  """200 shapes through a stateful `jit` with a 512 KiB state cost the RSS plain `jax.jit` costs.

  "Baseline" is the same 200 programs compiled by plain `jax.jit` in a fresh process, one new
  function per shape, the last `default_cache_size` of them kept alive as meshstate's cache
  keeps its entries. It is not the RSS before the loop: each compiled XLA:CPU program costs
  memory while it lives (about 1.5 MiB on jax 0.10, 0.2 MiB on 0.12), and some per program
  compiled stays with the process after the program goes (JAX's caches, heap fragmentation),
  with plain `jax.jit` too.
  meshstate must add nothing of its own: RSS with the cache full and after `cache_clear()`
  within 10% + 6 MiB of the baseline's (meshstate's discovery trace adds entries to JAX's
  bounded caches), and no evicted or cleared entry's program still alive. The two protocols
  run at once.
  """
  src = str(pathlib.Path(meshstate.__file__).resolve().parent.parent)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(jax.device_count()),
         'JAX_DISABLE_MOST_OPTIMIZATIONS': '1',   # compiles 25% faster, in both protocols
         # One malloc arena: with one per compiling thread, how much of the freed heap the trim
         # can hand back varied by up to 10 MiB from run to run on a loaded machine (both arms).
         'MALLOC_ARENA_MAX': '1',
         'PYTHONPATH': os.pathsep.join([src, os.environ.get('PYTHONPATH', '')])}
  procs = {arm: subprocess.Popen([sys.executable, '-c', _RSS_ARM, arm], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for arm in ('meshstate', 'jax')}
  out = {}
  for arm, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    out[arm] = json.loads(stdout.splitlines()[-1])
  ms, plain = out['meshstate'], out['jax']
  total = 2 * 1.0 + sum(range(2, 202))
  assert ms['value'] == plain['value'] == total
  assert ms['programs'] == plain['programs'] == 200
  assert plain['alive'] == 0 and ms['alive'] == 0, out
  assert plain['held'] > plain['after'] + 5, out   # the protocol sees the kept programs
  assert ms['held'] <= 1.1 * plain['held'] + 6, out
  assert ms['after'] <= 1.1 * plain['after'] + 6, out
