"""Steady-state per-call time of a stateful `pmap2` step against hand-written baselines.

Each case updates S states (S = 1 and 256) of shape (n, 4) by a mapped argument on a 1-D
mesh of all devices. Baselines measured in the same run, interleaved round by round:
  - `jit(shard_map)`: hand-written `jax.jit(jax.shard_map(...))` that passes the states in and
    out explicitly, pre-sharded and donated (the target: ratios near 1);
  - `jax.pmap` of the same pure step;
  - brainstate's `pmap2`, when brainstate is installed (one call a round: on current JAX it
    compiles on every call).
Prints a table of median times and ratios (the median over rounds of each round's time over the
baseline's in that round) and writes JSON (default bench/results/dispatch.json).

  python bench/dispatch.py [--rounds 15] [--calls 20] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

if 'jax' not in sys.modules and not os.environ.get('JAX_PLATFORMS'):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshstate
from meshstate.transform import pmap2


def _meshstate_case(n_states, x, n):
  states = [meshstate.ParamState(jnp.zeros((n, 4))) for _ in range(n_states)]

  def step(x):
    for s in states:
      s.value = s.value + x
    return x

  f = pmap2(step, axis_name='i', state_in_axes=meshstate.ParamState,
            state_out_axes=meshstate.ParamState, donate_states=True)
  return lambda: f(x)


def _shard_map_case(n_states, x, mesh, n):
  sharding = NamedSharding(mesh, P('i'))
  box = [[jax.device_put(jnp.zeros((n, 4)), sharding) for _ in range(n_states)]]

  def step(x, vals):
    return x, [v + x for v in vals]

  g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P('i'), P('i')),
                            out_specs=(P('i'), P('i'))), donate_argnums=1)

  def call():
    out, box[0] = g(x, box[0])
    return out
  return call


def _pmap_case(n_states, n):
  x = jax.pmap(lambda v: v)(jnp.ones((n, 4)))
  box = [jax.pmap(lambda v: [v] * n_states)(jnp.zeros((n, 4)))]
  g = jax.pmap(lambda x, vals: (x, [v + x for v in vals]), axis_name='i', donate_argnums=1)

  def call():
    out, box[0] = g(x, box[0])
    return out
  return call


def _brainstate_case(n_states, x, n):
  try:
    import brainstate
  except ImportError:
    return None
  states = [brainstate.ParamState(jnp.zeros((n, 4))) for _ in range(n_states)]

  def step(x):
    for s in states:
      s.value = s.value + x
    return x

  f = brainstate.transform.pmap2(step, axis_name='i',
                                 state_in_axes={0: brainstate.util.filter.OfType(
                                     brainstate.ParamState)},
                                 state_out_axes={0: brainstate.util.filter.OfType(
                                     brainstate.ParamState)})
  return lambda: f(x)


def measure(rounds: int, calls: int) -> list[dict]:
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ('i',))
  x = jax.device_put(jnp.ones((n, 4)), NamedSharding(mesh, P('i')))
  rows = []
  for n_states in (1, 256):
    cases = {'meshstate.pmap2': _meshstate_case(n_states, x, n),
             'jit(shard_map)': _shard_map_case(n_states, x, mesh, n),
             'jax.pmap': _pmap_case(n_states, n)}
    bs = _brainstate_case(n_states, x, n)
    if bs is not None:
      cases['brainstate.pmap2'] = bs
    times = {k: [] for k in cases}
    for call in cases.values():   # compile and warm up
      for _ in range(3):
        jax.block_until_ready(call())
    order = [k for k in cases if k != 'brainstate.pmap2']
    rng = random.Random(0)
    for _ in range(rounds):
      rng.shuffle(order)   # no variant always runs right after another
      # brainstate's pmap2 recompiles on every call on current JAX: one call a round, last.
      for name in order + [k for k in cases if k == 'brainstate.pmap2']:
        n_calls = calls if name != 'brainstate.pmap2' else 1
        t0 = time.perf_counter()
        for _ in range(n_calls):
          out = cases[name]()
        jax.block_until_ready(out)
        times[name].append((time.perf_counter() - t0) / n_calls)
    base = times['jit(shard_map)']
    for name, ts in times.items():
      # Rounds interleave the variants, so a round's ratio cancels the machine's drift.
      ratio = statistics.median(t / b for t, b in zip(ts, base))
      rows.append({'states': n_states, 'variant': name, 'median_us': statistics.median(ts) * 1e6,
                   'ratio_vs_jit_shard_map': ratio})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rounds', type=int, default=21)
  parser.add_argument('--calls', type=int, default=20)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'dispatch.json'))
  args = parser.parse_args(argv)
  rows = measure(args.rounds, args.calls)
  print(f'{"states":>6}  {"variant":<18} {"median us/call":>15} {"ratio vs jit(shard_map)":>24}')
  for r in rows:
    print(f'{r["states"]:>6}  {r["variant"]:<18} {r["median_us"]:>15.1f} '
          f'{r["ratio_vs_jit_shard_map"]:>24.2f}')
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  meta = {'jax': jax.__version__, 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform, 'machine': platform.machine(),
          'rounds': args.rounds, 'calls_per_round': args.calls}
  with open(args.out, 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
