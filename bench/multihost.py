"""Per-call time of `pmap2` on 2 processes x 4 CPU devices against a hand-written program.

Launches 2 JAX processes on 127.0.0.1 (gloo CPU collectives, a free port, a timeout, children
killed by pid). In each, a stateful step updates S mapped states (`s.value = s.value + x`,
donated) over the default global mesh of all 8 devices. Variants, interleaved round by round in
the same shuffled order in both processes:
  - `meshstate.pmap2 (local parts)`: each process passes its local part (4 lanes) and gets its
    part back, as under `jax.pmap`; states start with the local shape and become global;
  - `meshstate.pmap2 (global arrays)`: the same with the input already a global array;
  - `jax.pmap` of the same step written functionally, local parts in and out;
  - `jit(shard_map)`: the hand-written `jax.jit(jax.shard_map(...))` on the same global mesh,
    global input and states, donated (the baseline);
  - `jit(shard_map) (local parts)`: the same program given `to_global(local part)` and returning
    `to_local(output)`, what a hand-written program pays to keep `jax.pmap`'s local contract.
Every call is blocked on (CPU gloo hangs when ~100 collective programs are queued). Ratios are
medians over rounds of each round's time over the baseline's, per process.

  python bench/multihost.py [--states 1,16] [--rounds 15] [--calls 10] [--quick]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import _timing as T

_FORCE_FLAG = '--xla_force_host_platform_device_count'
COLUMNS = [('states', 'states', 'd'), ('variant', 'variant', ''),
           ('median_us', 'µs/call (p0)', '.1f'), ('overhead_us', 'overhead µs (p0)', '+.1f'),
           ('ratio', 'ratio (p0)', '.3f'), ('ratio_q1', 'q1', '.3f'), ('ratio_q3', 'q3', '.3f'),
           ('ratio_p1', 'ratio (p1)', '.3f')]


# -- child: one process of the program ------------------------------------------------------------

def _initialize(port: int, process_id: int, processes: int, local_devices: int) -> None:
  import jax
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', local_devices)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                             num_processes=processes, process_id=process_id,
                             cluster_detection_method='deactivate', initialization_timeout=60)


def _cases(n_states: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import meshstate
  from meshstate.multihost import global_devices, local_value, to_global, to_local
  from meshstate.transform import pmap2
  local_n = jax.local_device_count()
  mesh = Mesh(np.array(global_devices()), ('i',))
  sharding = NamedSharding(mesh, P('i'))
  x_local = jnp.ones((local_n, 4))
  x_global = to_global(np.ones((local_n, 4), np.float32), sharding)

  def expect(parts, calls):
    for part in parts:
      if not np.all(np.asarray(part) == calls):
        raise AssertionError(f'after {calls} calls a state holds {np.asarray(part).ravel()[:4]}')

  def stateful(name, x):
    states = [meshstate.ParamState(jnp.zeros((local_n, 4))) for _ in range(n_states)]

    def step(x):
      for s in states:
        s.value = s.value + x
      return x
    f = pmap2(step, axis_name='i', state_in_axes=meshstate.ParamState,
              state_out_axes=meshstate.ParamState, donate_states=True)
    return T.Case(name, lambda: f(x),
                  lambda k: expect([local_value(states[0]), local_value(states[-1])], k))

  def pmap_case():
    box = [jax.pmap(lambda v: [v] * n_states)(jnp.zeros((local_n, 4)))]
    g = jax.pmap(lambda x, vals: (x, [v + x for v in vals]), axis_name='i', donate_argnums=1)

    def call():
      out, box[0] = g(x_local, box[0])
      return out
    return T.Case('jax.pmap', call, lambda k: expect([box[0][0], box[0][-1]], k))

  def shard_map_case(local: bool):
    box = [[to_global(np.zeros((local_n, 4), np.float32), sharding) for _ in range(n_states)]]
    g = jax.jit(jax.shard_map(lambda x, vals: (x, [v + x for v in vals]), mesh=mesh,
                              in_specs=(P('i'), P('i')), out_specs=(P('i'), P('i'))),
                donate_argnums=1)

    def call():
      out, box[0] = g(x_global, box[0])
      return out

    def call_local():   # the same program, given and giving this process's parts
      out, box[0] = g(to_global(x_local, sharding), box[0])
      return to_local(out)
    return T.Case('jit(shard_map)' + (' (local parts)' if local else ''),
                  call_local if local else call,
                  lambda k: expect([to_local(box[0][0]), to_local(box[0][-1])], k))

  return [lambda: [stateful('meshstate.pmap2 (local parts)', x_local)],
          lambda: [stateful('meshstate.pmap2 (global arrays)', x_global)],
          lambda: [pmap_case()], lambda: [shard_map_case(False), shard_map_case(True)]]


def child(args) -> None:
  import jax
  _initialize(args.port, args.process_id, args.processes, args.local_devices)
  failures = T.Failures(args.fail)
  T.report(kind='startup', process=jax.process_index(), processes=jax.process_count(),
           devices=jax.device_count(), local_devices=jax.local_device_count(), jax=jax.__version__)
  for n_states in args.states:
    label = f'process {args.process_id}, {n_states} states: '
    cases = []
    for make in _cases(n_states):
      for case in make():   # no guard: a failure here must end both processes alike
        case.call = failures.wrap(case.name, case.call)
        cases.append(case)
    times = T.interleave(cases, args.rounds, args.calls, failures, block_each=True, label=label)
    for row in T.summarize(times, 'jit(shard_map)'):
      T.report(kind='row', process=args.process_id, states=n_states, **row)
  for what, text in failures.errors:
    T.report(kind='failure', process=args.process_id, what=what, text=text[-2000:])
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices('bench done')   # no process leaves while another runs
  sys.stdout.flush()
  sys.stderr.flush()
  if args.process_id == 0:
    # Process 0 hosts the coordination service; a process still exiting when it stops aborts.
    # The parent closes our stdin once the others are gone (read() then returns).
    waiter = threading.Thread(target=sys.stdin.read, daemon=True)
    waiter.start()
    waiter.join(timeout=60)
  # Skip JAX's shutdown: a collective that a failed variant left pending would block it.
  os._exit(0)


# -- parent: launch, wait, collect -------------------------------------------------------------

def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(local_devices: int) -> dict:
  env = T.child_env({'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': str(local_devices),
                     'PYTHONUNBUFFERED': '1'})
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_FORCE_FLAG)]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not flags:
    del env['XLA_FLAGS']
  return env


def _kill(child: subprocess.Popen) -> None:
  if child.poll() is None:
    try:
      os.kill(child.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    child.wait()


def launch(args) -> list[tuple[int | None, str, str]]:
  """Run the children; (returncode or None if killed, stdout, stderr) of each."""
  port = _free_port()
  argv = [sys.executable, __file__, '--child', '--port', str(port), '--processes',
          str(args.processes), '--local-devices', str(args.local_devices), '--states',
          ','.join(map(str, args.states)), '--rounds', str(args.rounds), '--calls',
          str(args.calls), '--fail', args.fail]
  with tempfile.TemporaryDirectory(prefix='meshstate-bench-mh-') as tmp:
    files, children = [], []
    start = time.monotonic()
    try:
      for i in range(args.processes):
        out = open(os.path.join(tmp, f'{i}.out'), 'w+')
        err = open(os.path.join(tmp, f'{i}.err'), 'w+')
        files.append((out, err))
        children.append(subprocess.Popen(argv + ['--process-id', str(i)], stdout=out,
                                         stderr=err, cwd=T.ROOT, env=_env(args.local_devices),
                                         stdin=subprocess.PIPE if i == 0 else subprocess.DEVNULL))
      while any(c.poll() is None for c in children):
        stdin = children[0].stdin
        if stdin and not stdin.closed and all(c.poll() is not None for c in children[1:]):
          stdin.close()                  # the others are gone: process 0 may stop the service
        if any(c.returncode not in (None, 0) for c in children):
          break                          # one failed: the others may wait in a collective
        if time.monotonic() - start > args.timeout:
          print(f'multihost: timed out after {args.timeout:.0f} s; killing the processes',
                file=sys.stderr)
          break
        time.sleep(0.05)
    finally:
      for c in children:
        _kill(c)
        if c.stdin is not None:
          c.stdin.close()
    got = []
    for c, (out, err) in zip(children, files):
      out.seek(0)
      err.seek(0)
      got.append((c.returncode if c.returncode is not None and c.returncode >= 0 else None,
                  out.read(), err.read()))
      out.close()
      err.close()
    return got


def main(argv=None) -> int:
  p = T.parser(__doc__, 'multihost')
  p.add_argument('--states', default='1,16')
  p.add_argument('--rounds', type=int, default=15)
  p.add_argument('--calls', type=int, default=10, help='calls per round, each blocked on')
  p.add_argument('--processes', type=int, default=2)
  p.add_argument('--local-devices', type=int, default=4)
  p.add_argument('--timeout', type=float, default=600.0, help='seconds for the whole launch')
  for hidden in ('--port', '--process-id'):
    p.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick and not args.child:
    args.states, args.rounds, args.calls, args.timeout = '1', 2, 3, 120.0
  args.states = [int(s) for s in str(args.states).split(',')]
  if args.child:
    child(args)
    return 0
  failures = T.Failures(args.fail)
  procs = launch(args)
  records = [r for _, out, _ in procs for r in T.results(out)]
  for i, (code, _, err) in enumerate(procs):
    if code != 0:
      failures.record(f'process {i}', f'exit {code} (None: killed)\n{err[-3000:]}')
  for r in records:
    if r['kind'] == 'failure':
      failures.record(r['what'], r['text'])
  p1 = {(r['states'], r['variant']): r for r in records
        if r['kind'] == 'row' and r['process'] == 1}
  rows = []
  for r in records:
    if r['kind'] == 'row' and r['process'] == 0:
      other = p1.get((r['states'], r['variant']), {})
      rows.append({**r, 'ratio_p1': other.get('ratio'), 'median_us_p1': other.get('median_us')})
  startup = [r for r in records if r['kind'] == 'startup']
  T.print_table(rows, COLUMNS)
  T.write_json(T.out_path(args, 'multihost'), rows,
               T.meta(processes=args.processes, local_devices=args.local_devices,
                      rounds=args.rounds, calls_per_round=args.calls, quick=args.quick,
                      startup=startup))
  return failures.exit_code()


if __name__ == '__main__':
  sys.exit(main())
