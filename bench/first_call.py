"""First-call time (trace + compile + run) of a stateful step against state count, fresh processes.

Each measurement runs in a FRESH Python process (nothing cached, nothing traced before): it makes
S states of shape (n, 4) and an input, starts the backend, then times the first call of the step
(`s.value = s.value + x` for every state, donated) until its results are ready, then one more
call. Garbage is collected before the clock (a full collection owed by the imports would
otherwise fall in the timed call of whichever variant allocates next). Variants:
  - `meshstate.pmap2` of the stateful step;
  - `jax.pmap` of the same step written functionally (the baseline of the ratio);
  - `jit(shard_map)`: the hand-written `jax.jit(jax.shard_map(...))` passing the states;
  - brainstate's `pmap2` when brainstate is installed (not donated: it has no donation).
Rounds run the variants in shuffled order; the ratio is the median over rounds of each round's
time over `jax.pmap`'s in that round.

  python bench/first_call.py [--states 1,16,64,256] [--rounds 3] [--shapes same|distinct] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import _timing as T

VARIANTS = ('meshstate.pmap2', 'jax.pmap', 'jit(shard_map)', 'brainstate.pmap2')
COLUMNS = [('states', 'states', 'd'), ('variant', 'variant', ''),
           ('first_call_s', 'first call s', '.3f'), ('ratio', 'ratio vs jax.pmap', '.3f'),
           ('ratio_q1', 'q1', '.3f'), ('ratio_q3', 'q3', '.3f'),
           ('second_call_us', 'second call µs', '.0f')]


# -- child: one variant, one state count, one fresh process ------------------------------------

def _step_fn(variant: str, n_states: int, distinct: bool = False):
  """The call to time and the values to block on, built without touching the compiler.

  `distinct`: state k has shape (n, 4 + k), as a model's parameters differ in shape, and the
  step adds x's first column to it."""
  import jax
  import jax.numpy as jnp
  n = jax.device_count()
  x = jnp.ones((n, 4))
  shapes = [(n, 4 + k if distinct else 4) for k in range(n_states)]

  def add(v, x):
    return v + x[..., :1] if distinct else v + x
  if variant in ('meshstate.pmap2', 'brainstate.pmap2'):
    if variant == 'meshstate.pmap2':
      import meshstate as lib
      from meshstate.transform import pmap2
      kw = dict(state_in_axes=lib.ParamState, state_out_axes=lib.ParamState, donate_states=True)
    else:
      import brainstate as lib
      pmap2 = lib.transform.pmap2
      only = {0: lib.util.filter.OfType(lib.ParamState)}
      kw = dict(state_in_axes=only, state_out_axes=only)
    states = [lib.ParamState(jnp.zeros(shape)) for shape in shapes]

    def step(x):
      for s in states:
        s.value = add(s.value, x)
      return x
    f = pmap2(step, axis_name='i', **kw)
    return (lambda: f(x)), (lambda: [s.value for s in states]), [x] + [s.value for s in states]

  def step(x, vals):
    return x, [add(v, x) for v in vals]
  if variant == 'jax.pmap':
    g = jax.pmap(step, axis_name='i', donate_argnums=1)
  else:
    from jax.sharding import Mesh, PartitionSpec as P
    import numpy as np
    mesh = Mesh(np.array(jax.devices()), ('i',))
    g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P('i'), P('i')),
                              out_specs=(P('i'), P('i'))), donate_argnums=1)
  box = [[jnp.zeros(shape) for shape in shapes]]

  def call():
    out, box[0] = g(x, box[0])
    return out
  return call, (lambda: box[0]), [x] + box[0]


def child(variant: str, n_states: int, fail: str, distinct: bool) -> None:
  import jax
  import numpy as np
  call, values, made = _step_fn(variant, n_states, distinct)
  jax.block_until_ready(made)   # inputs exist and the backend is up before the clock starts
  # A full garbage collection that the imports made due lands in whichever variant allocates
  # next (0.08-0.1 s here, with jax imported): collect it before the clock, in every variant.
  gc.collect()
  if variant == fail:
    raise T.InjectedFailure(f'--fail {variant}')
  t0 = time.perf_counter()
  jax.block_until_ready((call(), values()))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready((call(), values()))
  second = time.perf_counter() - t0
  got = [np.asarray(v) for v in values()]
  if not all(np.all(v == 2) for v in got):
    raise AssertionError(f'{variant}: after 2 calls the states are not all 2.0')
  T.report(variant=variant, states=n_states, first_call_s=first, second_call_us=second * 1e6)


# -- parent ------------------------------------------------------------------------------------

def _has_brainstate() -> bool:
  import importlib.util
  return importlib.util.find_spec('brainstate') is not None


def measure(args, failures: T.Failures) -> list[dict]:
  variants = [v for v in args.variants if v != 'brainstate.pmap2' or _has_brainstate()]
  runs = {(s, v): [] for s in args.states for v in variants}
  rng = random.Random(0)

  def one(n_states, v):
    return failures.guard(f'{n_states} states: {v}', lambda: T.run_child(
        [__file__, '--child', v, str(n_states), '--fail', args.fail, '--shapes', args.shapes],
        args.timeout))

  for r in range(args.rounds):
    for n_states in args.states:
      order = [v for v in variants if runs[n_states, v] is not None]   # None: failed before
      rng.shuffle(order)
      print(f'round {r + 1}/{args.rounds}: {n_states} states, {", ".join(order)}',
            file=sys.stderr, flush=True)
      with ThreadPoolExecutor(args.jobs) as pool:   # --jobs 1: one process at a time
        outs = list(pool.map(lambda v, n=n_states: one(n, v), order))
      for v, out in zip(order, outs):
        runs[n_states, v] = None if out is None else runs[n_states, v] + out
  rows = []
  for n_states in args.states:
    base = runs.get((n_states, 'jax.pmap'))
    for v in variants:
      got = runs[n_states, v]
      if not got:
        continue
      first = [g['first_call_s'] for g in got]
      row = {'states': n_states, 'variant': v, 'first_call_s': statistics.median(first),
             'second_call_us': statistics.median(g['second_call_us'] for g in got),
             'first_call_all_s': first}
      if base:
        row['ratio_q1'], row['ratio'], row['ratio_q3'] = T.quartiles(
            [a / b['first_call_s'] for a, b in zip(first, base)])
      rows.append(row)
  return rows


def main(argv=None) -> int:
  p = T.parser(__doc__, 'first_call')
  p.add_argument('--states', default='1,16,64,256')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--timeout', type=float, default=900.0, help='seconds per child process')
  p.add_argument('--jobs', type=int, default=1,
                 help='processes at a time (more than 1 only to check that it runs)')
  p.add_argument('--shapes', choices=('same', 'distinct'), default='same',
                 help="the states' shapes: all (n, 4), or state k (n, 4 + k)")
  p.add_argument('--child', nargs=2, metavar=('VARIANT', 'STATES'), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    child(args.child[0], int(args.child[1]), args.fail, args.shapes == 'distinct')
    return 0
  if args.quick:
    args.states, args.rounds, args.variants, args.jobs = '4', 1, 'meshstate.pmap2,jax.pmap', 2
  args.states = [int(s) for s in args.states.split(',')]
  args.variants = args.variants.split(',')
  # `meta`'s load_average is taken when the measurement has ended.
  name = 'first_call' if args.shapes == 'same' else 'first_call_distinct_shapes'
  return T.run(args, name, measure, COLUMNS, rounds=args.rounds, shapes=args.shapes,
               fresh_process_each=True)


if __name__ == '__main__':
  sys.exit(main())
