"""Peak memory of a stateful step, donated and not, against the states' size plus its temporaries.

A step updates S states of shape (n, m) float32 (`s.value = s.value * 0.5 + x`) and returns
`x * 2`, on a 1-D mesh of the n devices. For `meshstate.pmap2` and the hand-written
`jit(shard_map)` that passes the same states, each donated and not, it measures per call:
  - live arrays (`jax.live_arrays()`: count and bytes) before and after the call;
  - the peak resident memory during the call (Linux: the peak-RSS counter, restarted just
    before the call) above the resident memory just before it. glibc's mmap threshold is fixed
    low first (`mallopt`), so every device buffer is its own mapping, returned to the system
    when freed: resident memory then follows the live buffers;
  - the step's temporaries: the arguments that are not states (`x`), the outputs that are not
    states (`x * 2`) and XLA's temporary buffers (`memory_analysis()`, all devices).
peak live = live bytes before + peak RSS rise; ratio = peak live / (states + temporaries).
Donated, the written states reuse their buffers (ratio near 1); not donated, the new states
exist beside the old ones until the call returns (ratio near 2 when the states dominate).

  python bench/memory.py [--states 16] [--width 131072] [--calls 5] [--quick]
"""
from __future__ import annotations

import gc
import sys

import _timing as T

MIB = 2 ** 20
MMAP_THRESHOLD = 65536   # bytes: every larger allocation gets its own mapping
COLUMNS = [('variant', 'variant', ''), ('donated', 'donated', ''),
           ('states_mib', 'states MiB', '.1f'), ('xla_temp_mib', 'XLA temp MiB', '.1f'),
           ('temps_mib', 'temporaries MiB', '.1f'),
           ('live_before_mib', 'live before MiB', '.1f'), ('rise_mib', 'peak rise MiB', '.1f'),
           ('peak_mib', 'peak live MiB', '.1f'), ('ratio', 'peak / (states + temps)', '.3f'),
           ('live_after_mib', 'live after MiB', '.1f'),
           ('arrays', 'live arrays before→after', '')]


def _mmap_large_buffers() -> bool:
  """Make glibc map every allocation over MMAP_THRESHOLD on its own (False: not glibc)."""
  import ctypes
  try:
    libc = ctypes.CDLL('libc.so.6')
    # M_MMAP_THRESHOLD (-3) fixed (which also stops glibc from raising it), M_TRIM_THRESHOLD (-1)
    return bool(libc.mallopt(-3, MMAP_THRESHOLD)) and bool(libc.mallopt(-1, MMAP_THRESHOLD))
  except (OSError, AttributeError):
    return False


def _xla_temp_bytes(compiled) -> int | None:
  """XLA's temporary bytes of a compiled program, summed over the devices (None: unknown)."""
  import jax
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return None
  return None if stats is None else stats.temp_size_in_bytes * jax.device_count()


def _cases(n_states: int, width: int, donate: bool, failures: T.Failures):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import meshstate
  from meshstate.transform import pmap2
  n = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ('i',))
  sharding = NamedSharding(mesh, P('i'))
  x = jax.device_put(jnp.ones((n, width)), sharding)

  def make_meshstate():
    states = [meshstate.ParamState(jax.device_put(jnp.zeros((n, width)), sharding))
              for _ in range(n_states)]

    def step(x):
      for s in states:
        s.value = s.value * 0.5 + x
      return x * 2
    f = pmap2(step, axis_name='i', state_in_axes=meshstate.ParamState,
              state_out_axes=meshstate.ParamState, donate_states=donate)
    temp = _xla_temp_bytes(f.lower(x).compile())
    return (lambda: f(x)), (lambda: [s.value for s in states]), temp

  def make_shard_map():
    box = [[jax.device_put(jnp.zeros((n, width)), sharding) for _ in range(n_states)]]

    def step(x, vals):
      return x * 2, [v * 0.5 + x for v in vals]
    g = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P('i'), P('i')),
                              out_specs=(P('i'), P('i'))), donate_argnums=1 if donate else ())
    temp = _xla_temp_bytes(g.lower(x, box[0]).compile())

    def call():
      out, box[0] = g(x, box[0])
      return out
    return call, (lambda: box[0]), temp

  for name, make in (('meshstate.pmap2', make_meshstate), ('jit(shard_map)', make_shard_map)):
    made = failures.guard(f'{name} donated={donate}: build', make)
    if made is not None:
      call, values, temp = made
      yield name, failures.wrap(name, call), values, temp, x


def _measure_one(call, values, calls: int) -> dict:
  """The worst call of `calls`: live arrays before/after and the peak RSS rise during it."""
  import jax
  jax.block_until_ready(call())
  jax.block_until_ready(call())   # compiled, warm, states laid out
  worst = None
  for _ in range(calls):
    gc.collect()
    count0, live0 = T.live_arrays()
    rss0 = T.rss_bytes()
    if not T.reset_peak_rss():
      raise RuntimeError('cannot restart the peak-RSS counter (/proc/self/clear_refs)')
    out = call()
    jax.block_until_ready((out, values()))
    peak = T.peak_rss_bytes()
    del out
    gc.collect()
    count1, live1 = T.live_arrays()
    got = {'live_before': live0, 'rise': max(0, peak - rss0), 'live_after': live1,
           'arrays': f'{count0}→{count1}'}
    if worst is None or got['rise'] > worst['rise']:
      worst = got
  return worst


def measure(args, failures: T.Failures) -> list[dict]:
  import jax
  import numpy as np
  if not _mmap_large_buffers():
    raise SystemExit('memory: needs glibc (mallopt) to make resident memory follow the buffers')
  rows = []
  for donate in (True, False):
    for name, call, values, temp, x in _cases(args.states, args.width, donate, failures):
      got = failures.guard(f'{name} donated={donate}',
                           lambda call=call, values=values: _measure_one(call, values,
                                                                          args.calls))
      if got is None:
        continue
      states = sum(v.nbytes for v in values())
      temps = 2 * x.nbytes + (temp or 0)   # x in, x * 2 out, XLA's temporaries
      peak = got['live_before'] + got['rise']
      want = 2 * (1 - 0.5 ** (args.calls + 2))   # s <- s / 2 + 1 from 0, calls + 2 times
      sample = np.asarray(values()[-1])
      if not np.allclose(sample, want, rtol=1e-5):
        failures.record(f'{name} donated={donate} (values)',
                        f'a state holds {sample.ravel()[:4]}, expected {want}')
      rows.append(dict(
          variant=name, donated='yes' if donate else 'no', states_mib=states / MIB,
          temps_mib=temps / MIB, xla_temp_mib=None if temp is None else temp / MIB,
          live_before_mib=got['live_before'] / MIB, rise_mib=got['rise'] / MIB,
          peak_mib=peak / MIB, ratio=peak / (states + temps),
          live_after_mib=got['live_after'] / MIB, arrays=got['arrays'],
          devices=jax.device_count()))
      del call, values, x
      gc.collect()
  return rows


def main(argv=None) -> int:
  p = T.parser(__doc__, 'memory')
  p.add_argument('--states', type=int, default=16)
  p.add_argument('--width', type=int, default=131072,
                 help='m: each state is (devices, m) float32 (default 4 MiB on 8 devices)')
  p.add_argument('--calls', type=int, default=5, help='measured calls per variant (worst kept)')
  args = p.parse_args(argv)
  if args.quick:
    args.states, args.width, args.calls = 4, 32768, 2
  return T.run(args, 'memory', measure, COLUMNS, states=args.states, width=args.width,
               calls=args.calls, mmap_threshold=MMAP_THRESHOLD,
               method='peak live = live bytes before + peak RSS rise during the call')


if __name__ == '__main__':
  sys.exit(main())
