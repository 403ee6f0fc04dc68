"""More lanes than devices: `pmap2` over 64 lanes on 8 devices against a hand-written program.

Each case maps an input of 64 lanes (shape (64, 4)) and updates S states of 64 lanes each
(`s.value = s.value + x`, donated) and returns `x` plus the `psum` of `x` over all 64 lanes.
Variants, interleaved round by round in shuffled order:
  - `meshstate.pmap2` over the 64 lanes (each device runs its 8 lanes with `vmap`);
  - `jit(shard_map(vmap))`: the hand-written `jax.jit(jax.shard_map(jax.vmap(...)))` on a 1-D
    mesh of the devices, passing the states in and out pre-sharded and donated, the `psum` over
    the vmapped and the mesh axis, `check_vma=False` as under `jax.pmap` (the baseline);
  - `jit(vmap(spmd_axis_name))`: `jax.jit(jax.vmap(..., spmd_axis_name=...))` with the lanes
    sharded over the devices, which is the program `pmap2` runs here (see its `explain`).
Prints median µs/call and the overhead over the baseline in µs and as a ratio (medians over
rounds of each round's difference and ratio), checks every variant's values, writes JSON.

  python bench/lanes.py [--lanes 64] [--states 1,16,256] [--rounds 15] [--quick]
"""
from __future__ import annotations

import sys
from functools import partial

import _timing as T

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshstate
from meshstate.transform import pmap2

COLUMNS = [('lanes', 'lanes', 'd'), ('devices', 'devices', 'd'), ('states', 'states', 'd'),
           ('variant', 'variant', ''), ('median_us', 'µs/call', '.1f'),
           ('overhead_us', 'overhead µs', '+.1f'), ('ratio', 'ratio', '.3f'),
           ('ratio_q1', 'q1', '.3f'), ('ratio_q3', 'q3', '.3f')]


def _check(out, values, lanes: int, calls: int) -> None:
  total = np.asarray(out[1])
  if not np.all(total == lanes):
    raise AssertionError(f'psum over {lanes} lanes gave {total.ravel()[:4]}..., expected {lanes}')
  for v in values:
    if not np.all(np.asarray(v) == calls):
      raise AssertionError(f'after {calls} calls a state holds {np.asarray(v).ravel()[:4]}')


def meshstate_case(n_states, x):
  lanes = x.shape[0]
  states = [meshstate.ParamState(jnp.zeros((lanes, 4))) for _ in range(n_states)]

  def step(x):
    for s in states:
      s.value = s.value + x
    return x, lax.psum(x, 'i')

  f = pmap2(step, axis_name='i', state_in_axes=meshstate.ParamState,
            state_out_axes=meshstate.ParamState, donate_states=True)
  return T.Case('meshstate.pmap2', lambda: f(x),
                lambda k: _check(f(x), [s.value for s in (states[0], states[-1])], lanes, k + 1))


def _hand_written_case(name: str, g, x, box: list, lanes: int) -> T.Case:
  """A hand-written program `g(x, states) -> (out, states)`, its states carried in `box`."""
  def call():
    out, box[0] = g(x, box[0])
    return out

  def check(k):
    out = call()
    _check(out, [box[0][0], box[0][-1]], lanes, k + 1)
  return T.Case(name, call, check)


def shard_map_vmap_case(n_states, x, mesh):
  lanes = x.shape[0]
  sharding = NamedSharding(mesh, P('d'))
  box = [[jax.device_put(jnp.zeros((lanes, 4)), sharding) for _ in range(n_states)]]

  def lane(x, vals):
    return (x, lax.psum(x, ('d', 'l'))), [v + x for v in vals]

  per_device = jax.vmap(lane, axis_name='l')
  g = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('d'), P('d')),
                            out_specs=((P('d'), P('d')), P('d')), check_vma=False),
              donate_argnums=1)

  return _hand_written_case('jit(shard_map(vmap))', g, x, box, lanes)


def jit_vmap_case(n_states, x, mesh):
  lanes = x.shape[0]
  sharding = NamedSharding(mesh, P('d'))
  box = [[jax.device_put(jnp.zeros((lanes, 4)), sharding) for _ in range(n_states)]]

  def lane(x, vals):
    return (x, lax.psum(x, 'l')), [v + x for v in vals]

  g = jax.jit(jax.vmap(lane, axis_name='l', spmd_axis_name='d'), in_shardings=sharding,
              out_shardings=sharding, donate_argnums=1)

  return _hand_written_case('jit(vmap(spmd_axis_name))', g, x, box, lanes)


def measure(args, failures: T.Failures) -> list[dict]:
  devices = jax.device_count()
  if args.lanes % devices:
    raise SystemExit(f'--lanes {args.lanes} is not a multiple of the {devices} devices')
  mesh = Mesh(np.array(jax.devices()), ('d',))
  x = jax.device_put(jnp.ones((args.lanes, 4)), NamedSharding(mesh, P('d')))
  rows = []
  for n_states in args.states:
    label = f'{args.lanes} lanes, {n_states} states: '
    cases = []
    for make in (partial(meshstate_case, n_states, x),
                 partial(shard_map_vmap_case, n_states, x, mesh),
                 partial(jit_vmap_case, n_states, x, mesh)):
      case = failures.guard(label + make.func.__name__, make)
      if case is not None:
        case.call = failures.wrap(case.name, case.call)
        cases.append(case)
    times = T.interleave(cases, args.rounds, args.calls, failures, label=label,
                         target_s=args.target_ms / 1e3)
    for row in T.summarize(times, 'jit(shard_map(vmap))'):
      rows.append({'lanes': args.lanes, 'devices': devices, 'states': n_states, **row})
  return rows


def main(argv=None) -> int:
  p = T.parser(__doc__, 'lanes')
  p.add_argument('--lanes', type=int, default=64)
  p.add_argument('--states', default='1,16,256')
  p.add_argument('--rounds', type=int, default=15)
  p.add_argument('--calls', type=int, default=20, help='calls per round (at most)')
  p.add_argument('--target-ms', type=float, default=20.0)
  args = p.parse_args(argv)
  if args.quick:
    args.states, args.rounds, args.calls = '2', 3, 5
  args.states = [int(s) for s in args.states.split(',')]
  return T.run(args, 'lanes', measure, COLUMNS, rounds=args.rounds, calls_per_round=args.calls)


if __name__ == '__main__':
  sys.exit(main())
