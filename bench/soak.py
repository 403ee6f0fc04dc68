"""Soak: 10,000 calls of a stateful `pmap2` step; resident memory and live arrays must stay flat.

The step adds its input to a mapped `ParamState`, counts calls in a replicated `ShortTermState`,
and draws from the default random state (its key advances on every call). Variants: states
donated, not donated, and two input shapes in turn (two cache entries, both hit). Every
`--every` calls it samples the resident memory (RSS) and `jax.live_arrays()` (count and bytes).
A variant fails when the live-array count grows between the first and the last sample, or when
the counter does not equal the number of calls; RSS growth is reported, not judged (the
allocator and JAX's caches move it by a few MiB).

  python bench/soak.py [--calls 10000] [--every 1000] [--quick]
"""
from __future__ import annotations

import gc
import sys
import time

import _timing as T

import jax
import jax.numpy as jnp

import meshstate
from meshstate.transform import pmap2

MIB = 2 ** 20
COLUMNS = [('variant', 'variant', ''), ('calls', 'calls', 'd'), ('rss_mib', 'RSS MiB', '.1f'),
           ('live_arrays', 'live arrays', 'd'), ('live_kib', 'live KiB', '.1f'),
           ('us_per_call', 'µs/call since last', '.0f')]


def _step(donate: bool):
  n = jax.device_count()
  param = meshstate.ParamState(jnp.zeros((n, 4)))
  count = meshstate.ShortTermState(jnp.zeros((), jnp.int32))

  def step(x):
    param.value = param.value + x.sum(-1, keepdims=True) + meshstate.random.uniform(size=(4,))
    count.value = count.value + 1
    return param.value.sum()

  f = pmap2(step, axis_name='i', state_in_axes={0: param}, state_out_axes={0: param},
            donate_states=donate)
  return f, count


def soak(variant: str, calls: int, every: int, failures: T.Failures) -> list[dict]:
  n = jax.device_count()
  f, count = _step(variant != 'not donated')
  inputs = [jnp.ones((n, 4))] + ([jnp.ones((n, 8))] if variant == 'two shapes' else [])
  call = failures.wrap(variant, lambda i: f(inputs[i % len(inputs)]))
  for i in range(2 * len(inputs)):   # compile every signature before the first sample
    out = jax.block_until_ready(call(i))   # `out` stays alive, as at every later sample
  done = 2 * len(inputs)
  rows, t0 = [], time.perf_counter()
  for i in range(calls + 1):
    if i % every == 0:
      gc.collect()
      k, live = T.live_arrays()
      now = time.perf_counter()
      rows.append({'variant': variant, 'calls': i, 'rss_mib': T.rss_bytes() / MIB,
                   'live_arrays': k, 'live_kib': live / 1024,
                   'us_per_call': (now - t0) / every * 1e6 if i else None})
      t0 = time.perf_counter()
    if i == calls:
      break
    out = call(i)
    if i % 100 == 99:
      jax.block_until_ready(out)
  jax.block_until_ready(out)
  done += calls
  if int(count.value) != done:
    failures.record(f'soak {variant}',
                    f'the call counter is {int(count.value)} after {done} calls')
  if rows[-1]['live_arrays'] > rows[0]['live_arrays']:
    failures.record(f'soak {variant}', f'live arrays grew from {rows[0]["live_arrays"]} to '
                                       f'{rows[-1]["live_arrays"]} over {calls} calls')
  return rows


def main(argv=None) -> int:
  p = T.parser(__doc__, 'soak')
  p.add_argument('--calls', type=int, default=10000)
  p.add_argument('--every', type=int, default=1000)
  p.add_argument('--variants', default='donated,not donated,two shapes')
  args = p.parse_args(argv)
  if args.quick:
    args.calls, args.every, args.variants = 100, 50, 'donated,two shapes'
  failures = T.Failures(args.fail)
  rows, summary = [], []
  for variant in args.variants.split(','):
    got = failures.guard(f'soak {variant}', lambda v=variant: soak(v, args.calls, args.every,
                                                                  failures))
    if got:
      rows += got
      first, last = got[0], got[-1]
      summary.append({'variant': variant, 'calls': args.calls,
                      'rss_growth_mib': last['rss_mib'] - first['rss_mib'],
                      'live_arrays': f'{first["live_arrays"]}→{last["live_arrays"]}',
                      'live_kib': f'{first["live_kib"]:.1f}→{last["live_kib"]:.1f}'})
  T.print_table(rows, COLUMNS)
  print()
  T.print_table(summary, [('variant', 'variant', ''), ('calls', 'calls', 'd'),
                          ('rss_growth_mib', 'RSS growth MiB', '+.1f'),
                          ('live_arrays', 'live arrays', ''), ('live_kib', 'live KiB', '')])
  T.write_json(T.out_path(args, 'soak'), {'samples': rows, 'summary': summary},
               T.meta(calls=args.calls, every=args.every, quick=args.quick))
  return failures.exit_code()


if __name__ == '__main__':
  sys.exit(main())
