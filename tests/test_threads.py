"""Threads: no tracer is ever visible to another thread, and calls on shared states are atomic.

The programs here use no collectives: XLA's CPU backend can abort when programs with
collectives start from several threads at once (a plain `jax.jit(jax.shard_map(psum))` does
too), which is a property of that backend, not of meshstate.
"""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from meshstate import State
from meshstate.transform import jit, pmap2, vmap2

from helpers import N, no_tracer

THREADS = 8


def _run_threads(target, n=THREADS):
  errors, barrier = [], threading.Barrier(n)

  def run(i):
    try:
      barrier.wait()
      target(i)
    except BaseException as err:   # noqa: B036 - reported to the test below
      errors.append(err)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads), 'a thread hung'
  assert not errors, errors


def test_concurrent_first_calls_compile_once_and_each_counts():
  count, traces = State(jnp.zeros(())), []

  def step(x):
    traces.append(1)
    count.value = count.value + 1.0
    return x * 2

  f = pmap2(step, axis_name='i')
  x = jnp.arange(N, dtype=jnp.float32)
  outs = [None] * THREADS

  def call(i):
    outs[i] = f(x)

  _run_threads(call)
  no_tracer(count)
  assert float(count.value) == THREADS
  assert len(traces) == 1   # one signature, traced once (discovery is the program)
  for out in outs:
    np.testing.assert_array_equal(out, np.asarray(x) * 2)


def test_many_threads_many_calls_of_one_counter_step():
  count = State(jnp.zeros(()))

  @jit
  def step():
    count.value = count.value + 1.0

  def call(_):
    for _ in range(25):
      step()

  _run_threads(call)
  assert float(count.value) == THREADS * 25


def test_different_functions_adding_to_one_shared_state():
  shared = State(jnp.zeros(()))

  def make(k):
    def add(x):
      shared.value = shared.value + 1.0
      return x + k
    return vmap2(add)

  fs = [make(k) for k in range(THREADS)]
  _run_threads(lambda i: fs[i](jnp.zeros(2)))
  assert float(shared.value) == THREADS


def test_other_threads_never_see_a_tracer_and_keep_their_writes():
  s = State(jnp.ones(3))
  tracing, written = threading.Event(), threading.Event()
  seen = []

  @jit
  def slow_reader(x):
    y = s.value * x           # s is now a tracer in this thread's frame only
    tracing.set()
    written.wait(timeout=30)  # meanwhile, another thread reads and writes s
    return y

  def other():
    tracing.wait(timeout=30)
    seen.append(s.value)
    s.value = jnp.full(3, 5.0)
    written.set()

  t = threading.Thread(target=other)
  t.start()
  out = slow_reader(jnp.full(3, 2.0))
  t.join(timeout=30)
  assert not isinstance(seen[0], jax.core.Tracer)
  np.testing.assert_array_equal(seen[0], np.ones(3))
  np.testing.assert_array_equal(s.value, np.full(3, 5.0))   # the write is not undone
  assert out.shape == (3,)
  no_tracer(s)


def test_a_call_from_another_thread_waits_for_a_cached_call_in_flight():
  # A cached call runs its program between reading and writing back its states; a call of
  # another thread in between would read the state before that write, and one of the two
  # writes would be lost.
  count = State(jnp.zeros(()))

  @jit
  def add(k):
    count.value = count.value + k

  @jit
  def scale():
    count.value = count.value * 10.0

  entered, release = threading.Event(), threading.Event()

  def first():
    add(1.0)
    add(1.0)   # the next call is a cached one, on the direct path
    program = add._direct.fn

    def held(*slots):   # the call in flight: its state read, its program not yet run
      entered.set()
      release.wait(timeout=60)
      return program(*slots)
    add._direct.fn = held
    add(1.0)

  t1 = threading.Thread(target=first)
  t1.start()
  assert entered.wait(timeout=60)
  t2 = threading.Thread(target=scale)
  t2.start()
  time.sleep(0.3)
  waited = t2.is_alive()
  release.set()
  t1.join(timeout=60)
  t2.join(timeout=60)
  assert not t1.is_alive() and not t2.is_alive()
  assert waited
  assert float(count.value) == 30.0   # (1 + 1 + 1) * 10: scale ran after the third add
