"""Per-call time of a stateful `pmap2` step against a hand-written `jit(shard_map)`, by state count.

Each case updates S states of shape (n, 4) by a mapped argument (`s.value = s.value + x`) on a
1-D mesh of all n devices, with the written states donated or not. Variants, interleaved round
by round in shuffled order:
  - `meshstate.pmap2` (`donate_states=` as the case says);
  - `pmap2 program`: the program `pmap2` compiled, called by hand with the states' values and
    stored back, with no lock, cache or check (what `pmap2` adds over it is its call's Python);
  - `jit(shard_map)`: the hand-written `jax.jit(jax.shard_map(...))` that passes the same states
    in and out explicitly, pre-sharded (the baseline: ratios near 1);
  - `jax.pmap` of the same step written functionally (up to --pmap-max-states states);
  - brainstate's `pmap2` when brainstate is installed (up to 256 states, not donated: it has no
    donation; one call a round, since on current JAX it compiles on every call).
Prints median µs/call, the overhead over the baseline in µs and as a ratio (medians over rounds of
each round's difference and ratio), and writes JSON. Every variant's states are checked after
the run (each call adds 1 to every element).

`--profile` instead prints meshstate's own Python time per cached call, with the program replaced
by a stub; `--ablate` times the program by hand with each piece of `pmap2`'s call added alone
(the lock; the error boundary that filters tracebacks, and JAX's API-boundary decorator that it
replaced), beside an A/A control (see README, "Where the microseconds go").

  python bench/dispatch.py [--states 1,16,256,4096] [--rounds 15] [--calls 20] [--quick]
  python bench/dispatch.py --profile [--states 1,256]
  python bench/dispatch.py --ablate [--states 1] [--rounds 1000]
"""
from __future__ import annotations

import sys
from functools import partial

import _timing as T

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshstate
from meshstate.transform import pmap2

COLUMNS = [('states', 'states', 'd'), ('donated', 'donated', ''), ('variant', 'variant', ''),
           ('median_us', 'µs/call', '.1f'), ('overhead_us', 'overhead µs', '+.1f'),
           ('ratio', 'ratio', '.3f'), ('ratio_q1', 'q1', '.3f'), ('ratio_q3', 'q3', '.3f')]


def _expect(values, calls: int) -> None:
  for v in values:
    got = np.asarray(v)
    if not np.all(got == calls):
      raise AssertionError(f'after {calls} calls a state holds {got.ravel()[:4]}..., '
                           f'expected {float(calls)} everywhere')


def _ends(xs):
  return [xs[0], xs[-1]]


def meshstate_step(n_states, x, donate):
  n = x.shape[0]
  states = [meshstate.ParamState(jnp.zeros((n, 4))) for _ in range(n_states)]

  def step(x):
    for s in states:
      s.value = s.value + x
    return x

  return pmap2(step, axis_name='i', state_in_axes=meshstate.ParamState,
               state_out_axes=meshstate.ParamState, donate_states=donate), states


def meshstate_case(n_states, x, donate):
  f, states = meshstate_step(n_states, x, donate)
  return T.Case('meshstate.pmap2', lambda: f(x),
                lambda k: _expect([s.value for s in _ends(states)], k))


def _by_hand(n_states, x, donate):
  """meshstate's own compiled program for the step, as a call that reads the states, passes
  them and stores the results back (the slot stores `pmap2` makes), with no lock, cache or
  check; returns (call(x), states, calls made so far)."""
  f, states = meshstate_step(n_states, x, donate)
  f(x)
  f(x)
  fn = f._direct.fn   # private: the program the cached call runs (this benchmark only)

  def call(x):
    outs = fn(x, *[s._value for s in states])
    i = 1
    for s in states:
      s._value = outs[i]
      i += 1
    return outs[0]
  return call, states, 2


def program_case(n_states, x, donate, name='pmap2 program', wrap=None):
  """The program called by hand (what `pmap2` adds over it is the Python of its call), or with
  `wrap(call)` around that call: one piece of `pmap2`'s call, for `--ablate`."""
  call, states, made = _by_hand(n_states, x, donate)
  call = wrap(call) if wrap else call
  return T.Case(name, lambda: call(x),
                lambda k: _expect([s.value for s in _ends(states)], k + made))


def _locked(call):
  from meshstate.transform._engine import _call_lock   # private: the lock a call holds

  def locked(x):
    _call_lock.acquire()   # as pmap2's call holds it
    try:
      return call(x)
    finally:
      _call_lock.release()
  return locked


def _bounded(call):
  """`call` inside the error boundary pmap2's call has: a try whose handler filters the
  traceback as JAX's API boundary would (free until an error; the wrapper's frame is what
  this variant adds, as `_locked`'s does)."""
  from meshstate._compat import filter_traceback

  def bounded(x):
    try:
      return call(x)
    except Exception as err:
      filter_traceback(err)
      raise
  return bounded


def ablation(args, failures: T.Failures) -> list[dict]:
  """The pieces of a cached `pmap2` call, each added alone to the program called by hand, in
  one interleaved run: what each costs in place, right after a dispatch (see README)."""
  from meshstate._compat import api_boundary
  mesh, x = _mesh_and_input()
  rows = []
  for n_states in args.states:
    for donate in args.donate:
      cases = [shard_map_case(n_states, x, mesh, donate),
               program_case(n_states, x, donate, 'by hand'),
               program_case(n_states, x, donate, 'by hand, again'),   # the A/A control
               program_case(n_states, x, donate, '+ lock', _locked),
               program_case(n_states, x, donate, '+ API boundary', api_boundary),
               program_case(n_states, x, donate, '+ error boundary', _bounded),
               program_case(n_states, x, donate, '+ lock, error boundary',
                            lambda c: _bounded(_locked(c))),
               meshstate_case(n_states, x, donate)]
      for case in cases:
        case.call = failures.wrap(case.name, case.call)
      times = T.interleave(cases, args.rounds, args.calls, failures,
                           label=f'{n_states} states: ', target_s=args.target_ms / 1e3)
      for row in T.summarize(times, 'jit(shard_map)'):
        rows.append({'states': n_states, 'donated': 'yes' if donate else 'no', **row})
  return rows


def shard_map_case(n_states, x, mesh, donate):
  n = x.shape[0]
  sharding = NamedSharding(mesh, P('i'))
  box = [[jax.device_put(jnp.zeros((n, 4)), sharding) for _ in range(n_states)]]

  def step(x, vals):
    return x, [v + x for v in vals]

  g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P('i'), P('i')),
                            out_specs=(P('i'), P('i'))), donate_argnums=1 if donate else ())

  def call():
    out, box[0] = g(x, box[0])
    return out
  return T.Case('jit(shard_map)', call, lambda k: _expect(_ends(box[0]), k))


def pmap_case(n_states, n, donate):
  x = jax.pmap(lambda v: v)(jnp.ones((n, 4)))
  box = [jax.pmap(lambda v: [v] * n_states)(jnp.zeros((n, 4)))]
  g = jax.pmap(lambda x, vals: (x, [v + x for v in vals]), axis_name='i',
               donate_argnums=1 if donate else ())

  def call():
    out, box[0] = g(x, box[0])
    return out
  return T.Case('jax.pmap', call, lambda k: _expect(_ends(box[0]), k))


def brainstate_case(n_states, x):
  try:
    import brainstate
  except ImportError:
    return None
  n = x.shape[0]
  states = [brainstate.ParamState(jnp.zeros((n, 4))) for _ in range(n_states)]

  def step(x):
    for s in states:
      s.value = s.value + x
    return x

  only = {0: brainstate.util.filter.OfType(brainstate.ParamState)}
  f = brainstate.transform.pmap2(step, axis_name='i', state_in_axes=only, state_out_axes=only)
  return T.Case('brainstate.pmap2', lambda: f(x),
                lambda k: _expect([s.value for s in _ends(states)], k), calls_per_round=1)


def _mesh_and_input():
  """The 1-D mesh of every device, and the mapped input x of shape (devices, 4) laid out on it."""
  mesh = Mesh(np.array(jax.devices()), ('i',))
  return mesh, jax.device_put(jnp.ones((jax.device_count(), 4)), NamedSharding(mesh, P('i')))


def profile(args) -> list[dict]:
  """µs of Python per cached pmap2 call: its program replaced by a stub, so no device work.

  The stub returns one of 4 precomputed output tuples in turn, so that every call writes new
  objects into the states, as the real program does. Reported: the call minus the stub alone,
  each the minimum over rounds (the least disturbed by other jobs on the machine).
  """
  _, x = _mesh_and_input()
  rows = []
  for n_states in args.states:
    for donate in args.donate:
      call_us, stub_us = _stubbed(n_states, x, donate, args.rounds,
                                  max(20, args.calls * 200 // n_states))
      rows.append({'states': n_states, 'donated': 'yes' if donate else 'no',
                   'python_us': call_us - stub_us, 'stub_us': stub_us})
  return rows


def _stubbed(n_states, x, donate, rounds, calls) -> tuple[float, float]:
  """(µs per call of the stubbed pmap2 step, µs per call of the stub alone), minima."""
  import time
  f, states = meshstate_step(n_states, x, donate)
  T.block(f(x))
  entry = next(iter(f._lru))   # the one cache entry (private: this profile only)
  outs = [T.block(entry.fn(x, *[jnp.copy(s.value) for s in states])) for _ in range(4)]
  turn = iter(range(1 << 62))
  entry.fn = lambda *slots: outs[next(turn) & 3]
  f(x)
  vals = [s.value for s in states]

  def per_call(call):
    t0 = time.perf_counter()
    for _ in range(calls):
      call()
    return (time.perf_counter() - t0) / calls * 1e6
  call_us = min(per_call(lambda: f(x)) for _ in range(rounds))
  stub_us = min(per_call(lambda: entry.fn(x, *vals)) for _ in range(rounds))
  assert f.cache_info().misses == 1, f.cache_info()   # every stubbed call took the hit path
  return call_us, stub_us


def measure(args, failures: T.Failures) -> list[dict]:
  mesh, x = _mesh_and_input()
  n = x.shape[0]
  rows = []
  for n_states in args.states:
    for donate in args.donate:
      label = f'{n_states} states, donated={donate}: '
      makers = [('meshstate.pmap2', partial(meshstate_case, n_states, x, donate)),
                ('pmap2 program', partial(program_case, n_states, x, donate)),
                ('jit(shard_map)', partial(shard_map_case, n_states, x, mesh, donate))]
      if n_states <= args.pmap_max_states:
        makers.append(('jax.pmap', partial(pmap_case, n_states, n, donate)))
      if n_states <= 256 and not donate:
        makers.append(('brainstate.pmap2', partial(brainstate_case, n_states, x)))
      cases = []
      for name, make in makers:
        case = failures.guard(label + name, make)
        if case is not None:
          case.call = failures.wrap(case.name, case.call)
          cases.append(case)
      print(f'{label}compiling and timing {len(cases)} variants', file=sys.stderr, flush=True)
      times = T.interleave(cases, args.rounds, args.calls, failures, label=label,
                           target_s=args.target_ms / 1e3)
      for row in T.summarize(times, 'jit(shard_map)'):
        rows.append({'states': n_states, 'donated': 'yes' if donate else 'no', **row})
  return rows


def main(argv=None) -> int:
  p = T.parser(__doc__, 'dispatch')
  p.add_argument('--states', default='1,16,256,4096')
  p.add_argument('--donate', default='yes,no', help='yes, no, or yes,no')
  p.add_argument('--rounds', type=int, default=15)
  p.add_argument('--calls', type=int, default=20, help='calls per round (at most)')
  p.add_argument('--target-ms', type=float, default=20.0,
                 help='fewer calls per round when a round of one variant would take longer')
  p.add_argument('--pmap-max-states', type=int, default=256)
  p.add_argument('--profile', action='store_true',
                 help="only meshstate's Python time per call, the program stubbed out")
  p.add_argument('--ablate', action='store_true',
                 help="the pieces of pmap2's call added one at a time to the program by hand")
  args = p.parse_args(argv)
  if args.quick:
    args.states, args.donate, args.rounds, args.calls = '1', 'yes,no', 3, 5
  args.states = [int(s) for s in args.states.split(',')]
  args.donate = [d.strip() == 'yes' for d in args.donate.split(',')]
  if args.profile:
    T.print_table(profile(args), [('states', 'states', 'd'), ('donated', 'donated', ''),
                                  ('python_us', 'Python µs/call', '.2f'),
                                  ('stub_us', 'stub µs', '.2f')])
    return 0
  ablate = T.run(args, 'dispatch_ablation', ablation, COLUMNS, rounds=args.rounds,
                 calls_per_round=args.calls) if args.ablate or args.quick else 0
  if args.ablate:
    return ablate
  return T.run(args, 'dispatch', measure, COLUMNS, rounds=args.rounds,
               calls_per_round=args.calls) or ablate


if __name__ == '__main__':
  sys.exit(main())
