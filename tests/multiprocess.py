"""Run code in several JAX processes on 127.0.0.1: the multi-host test harness.

Each child is a fresh Python that joins JAX's multi-controller runtime as one "host" with its own
simulated CPU devices (`jax_num_cpu_devices`) and gloo CPU collectives, coordinated over
loopback on a free port. The children never inherit the 8-device setting of `conftest.py`.

Parent side:
  `launch(argv, ...)` starts the children (environment below), waits under one timeout and kills
  them by pid when one fails or time runs out; `run_checks(module, prefixes)` launches this file
  as the children, which run every `prefix*` function of `module` in ONE launch (process start
  and `import jax` dominate, a few seconds each) and stream one JSON line per check;
  `shared(...)` runs a launch once per pytest session, also under pytest-xdist.
Child side (`python multiprocess.py MODULE PREFIXES`): `initialize()` joins the runtime from the
  environment, then each check runs in every process; its return value (JSON-able: lists,
  numbers, strings) or its exception is reported, and the processes meet at a coordination
  barrier with a timeout after each check, so a check that leaves one process stuck in a
  collective is reported as such instead of hanging the launch. After the last barrier the
  other processes exit first, and process 0, which hosts the coordination service, exits once
  the parent has seen them go (it closes process 0's stdin), so no client outlives the service.

Environment of a child: `JAX_COORDINATOR_ADDRESS` (which `jax.distributed.initialize` reads
itself), `NUM_PROCESSES`, `PROCESS_ID`, `JAX_NUM_CPU_DEVICES`, `JAX_PLATFORMS=cpu`, and
`PYTHONPATH` = this repository's `src` and `tests`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = '@@meshstate-check '          # prefix of a result line on a child's stdout
_FORCE_FLAG = '--xla_force_host_platform_device_count'
_PORT_TAKEN = ('Address already in use', 'Failed to add port', 'address in use')

__all__ = ['Proc', 'free_port', 'child_env', 'launch', 'failure', 'run_checks', 'shared',
           'initialize', 'report', 'main']


# -- parent side -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Proc:
  """What one child left behind: exit status, output, and the checks it reported."""
  process_id: int
  returncode: int | None      # None: killed by the harness (timeout, or a sibling failed)
  stdout: str
  stderr: str
  results: dict               # check name -> {'value': ...} or {'error': 'Type: message'}
  seconds: float = 0.0        # wall time from start to exit (or kill)

  def tail(self, n: int = 3000) -> str:
    return (f'--- process {self.process_id} (returncode {self.returncode}, '
            f'{self.seconds:.1f} s) stderr tail:\n{self.stderr[-n:]}')


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(process_id: int, num_processes: int, port: int, local_devices: int = 4,
              extra: dict | None = None) -> dict:
  """The environment of child `process_id`: this one's, minus any forced device count."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_FORCE_FLAG)]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not flags:
    del env['XLA_FLAGS']
  path = [str(ROOT / 'src'), str(HERE)]
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(local_devices),
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', NUM_PROCESSES=str(num_processes),
             PROCESS_ID=str(process_id), PYTHONPATH=os.pathsep.join(path),
             PYTHONUNBUFFERED='1', TF_CPP_MIN_LOG_LEVEL=env.get('TF_CPP_MIN_LOG_LEVEL', '1'))
  env.update(extra or {})
  return env


def _kill(popen: subprocess.Popen) -> None:
  if popen.poll() is None:
    try:
      os.kill(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    popen.wait()


def _close_stdin(popen: subprocess.Popen) -> None:
  if popen.stdin is not None and not popen.stdin.closed:
    try:
      popen.stdin.close()
    except OSError:   # the child is gone already
      pass


def _results(stdout: str) -> dict:
  out = {}
  for line in stdout.splitlines():
    if line.startswith(RESULT):
      record = json.loads(line[len(RESULT):])
      out[record.pop('check')] = record
  return out


def _launch_once(argv, processes, local_devices, timeout, env, cwd) -> list[Proc]:
  port = free_port()
  with tempfile.TemporaryDirectory(prefix='meshstate-mp-') as tmp:
    files, children = [], []
    start = time.monotonic()
    try:
      for i in range(processes):
        out = open(os.path.join(tmp, f'{i}.out'), 'w+')
        err = open(os.path.join(tmp, f'{i}.err'), 'w+')
        files.append((out, err))
        # Process 0 hosts the coordination service: its stdin is a pipe that is closed once
        # every other child has exited, the sign that it may stop the service (`_linger`).
        children.append(subprocess.Popen(
            [sys.executable, *argv], stdout=out, stderr=err,
            stdin=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
            cwd=cwd or ROOT, env=child_env(i, processes, port, local_devices,
                                           {'MESHSTATE_LAUNCHED': repr(time.time()),
                                            **(env or {})})))
      ended = [None] * processes
      while any(e is None for e in ended):
        for i, child in enumerate(children):
          if ended[i] is None and child.poll() is not None:
            ended[i] = time.monotonic() - start
        if all(e is not None for e in ended[1:]):
          _close_stdin(children[0])                # the others are gone: 0 may stop the service
        if any(c.returncode not in (None, 0) for c in children):
          break                                  # one failed: the others may wait forever
        if time.monotonic() - start > timeout:
          break
        time.sleep(0.02)
    finally:
      for child in children:
        _kill(child)
        _close_stdin(child)
    procs = []
    for i, (child, (out, err)) in enumerate(zip(children, files)):
      out.seek(0)
      err.seek(0)
      stdout, stderr = out.read(), err.read()
      out.close()
      err.close()
      killed = ended[i] is None
      procs.append(Proc(i, None if killed else child.returncode, stdout, stderr,
                        _results(stdout), time.monotonic() - start if killed else ended[i]))
    return procs


def launch(argv: Sequence[str], processes: int = 2, local_devices: int = 4,
           timeout: float = 60.0, env: dict | None = None, cwd: str | None = None) -> list[Proc]:
  """Run `python *argv` as `processes` JAX processes on 127.0.0.1 and return what each left.

  Children get the environment of `child_env` (plus `env`). The launch ends when all have exited,
  when one exits with an error (the others are killed: they may be waiting in a collective), or
  after `timeout` seconds (all are killed by pid). A coordinator port that turned out to be
  taken is retried once with another.
  """
  procs = _launch_once(argv, processes, local_devices, timeout, env, cwd)
  if any(any(s in p.stderr for s in _PORT_TAKEN) for p in procs):
    procs = _launch_once(argv, processes, local_devices, timeout, env, cwd)
  return procs


def failure(procs: Sequence[Proc]) -> str | None:
  """None when every process exited with 0, else a report with each one's stderr tail."""
  if all(p.returncode == 0 for p in procs):
    return None
  what = ', '.join(f'process {p.process_id}: ' + ('killed (timeout or sibling failure)'
                                                   if p.returncode is None else
                                                   f'exit {p.returncode}') for p in procs)
  return f'{what}\n' + '\n'.join(p.tail() for p in procs)


def run_checks(module: str, prefixes: Sequence[str] = ('check_',), processes: int = 2,
               local_devices: int = 4, timeout: float = 60.0, barrier_s: float = 20.0,
               self_init: bool = False, env: dict | None = None) -> list[Proc]:
  """Run the functions of `module` (a module in tests/, or a .py path) in one launch.

  Those named `prefixes[0]*` run first (in definition order), then `prefixes[1]*`, and so on.
  `self_init`: the first function joins the runtime itself (`jax.distributed.initialize`).
  `env`: more environment variables for the children.
  """
  env = {'MESHSTATE_BARRIER_MS': str(int(barrier_s * 1000)), **(env or {})}
  if self_init:
    env['MESHSTATE_SELF_INIT'] = '1'
  return launch([str(HERE / 'multiprocess.py'), module, ','.join(prefixes)], processes,
                local_devices, timeout, env=env)


def shared(tmp_path_factory, key: str, run) -> list[Proc]:
  """`run()` once per pytest session, its result shared by all pytest-xdist workers.

  The first worker to ask runs it under a file lock in the session's shared temporary folder;
  the others wait for the lock and read the result. Without xdist it simply runs.
  """
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return run()
  import fcntl
  root = tmp_path_factory.getbasetemp().parent
  path = root / f'meshstate-mp-{key}.json'
  with open(root / f'meshstate-mp-{key}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if path.exists():
      return [Proc(**d) for d in json.loads(path.read_text())]
    procs = run()
    path.write_text(json.dumps([dataclasses.asdict(p) for p in procs]))
    return procs


# -- child side ------------------------------------------------------------------------------------

def initialize() -> tuple[int, int]:
  """Join the multi-process runtime from the environment; returns `(process_id, processes)`."""
  import jax
  process_id, processes = int(os.environ['PROCESS_ID']), int(os.environ['NUM_PROCESSES'])
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', int(os.environ.get('JAX_NUM_CPU_DEVICES', '4')))
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], processes, process_id,
                             cluster_detection_method='deactivate', initialization_timeout=60)
  return process_id, processes


def _jsonable(x: Any) -> Any:
  import numpy as np
  if hasattr(x, 'tolist'):
    if getattr(x, 'is_fully_addressable', True) is False:
      raise TypeError('a check returned a global jax.Array that spans other processes; '
                      'return its local part or a gathered copy')
    return np.asarray(x).tolist()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  raise TypeError(f'cannot report a {type(x).__name__}')


def report(check: str, **record: Any) -> None:
  """Print one result line (flushed at once, so a later hang cannot lose it)."""
  print(RESULT + json.dumps(dict(check=check, **record), default=_jsonable), flush=True)


def _load(module: str):
  """A module by name, or (a path ending in .py) from its file."""
  if not module.endswith('.py'):
    return importlib.import_module(module)
  name = pathlib.Path(module).stem
  spec = importlib.util.spec_from_file_location(name, module)
  loaded = importlib.util.module_from_spec(spec)
  sys.modules[name] = loaded
  spec.loader.exec_module(loaded)
  return loaded


def _linger(timeout_s: float) -> None:
  """Process 0: keep the coordination service up until every other process has exited.

  The other processes' clients poll the service for errors, so a service that stops first
  (process 0 exiting right after the last barrier) makes one of them abort with "Socket closed"
  although all its results are in. The parent closes process 0's stdin once the others have
  exited (`launch`); without a parent's pipe, or after `timeout_s`, it does not wait.
  """
  if sys.stdin is None or sys.stdin.isatty():
    return
  fd, deadline = sys.stdin.fileno(), time.monotonic() + timeout_s
  while (left := deadline - time.monotonic()) > 0:
    if select.select([fd], [], [], left)[0] and not os.read(fd, 4096):
      return   # end of file: the parent saw the others exit


def _startup(begun: float, imported: float) -> None:
  import jax
  ready = time.time()
  launched = float(os.environ.get('MESHSTATE_LAUNCHED', begun))
  report('_startup', value={'python_start_s': begun - launched, 'import_jax_s': imported - begun,
                            'initialize_s': ready - imported, 'ready_s': ready - launched,
                            'process_index': jax.process_index(),
                            'process_count': jax.process_count(),
                            'devices': jax.device_count(),
                            'local_devices': jax.local_device_count()})


def main(module_name: str, prefixes: str) -> int:
  """Child entry point: initialise, then run the module's checks (comma-separated prefixes).

  With `MESHSTATE_SELF_INIT=1` the first check initialises the runtime itself (a script that
  calls `jax.distributed.initialize`, like the documentation's first block).
  """
  begun = time.time()
  import jax
  from jax._src import distributed
  imported = time.time()
  self_init = os.environ.get('MESHSTATE_SELF_INIT') == '1'
  if not self_init:
    initialize()
    jax.devices()   # start the backend (and gloo) before the first check
    _startup(begun, imported)
  module = _load(module_name)
  checks = [(name, fn) for prefix in prefixes.split(',') for name, fn in vars(module).items()
            if name.startswith(prefix) and inspect.isfunction(fn)
            and fn.__module__ == module.__name__]
  barrier_ms = int(os.environ.get('MESHSTATE_BARRIER_MS', '20000'))
  for name, fn in checks:
    t0 = time.monotonic()
    try:
      value = fn()
      json.dumps(value, default=_jsonable)
      report(name, value=value, seconds=time.monotonic() - t0)
    except Exception as err:
      report(name, error=f'{type(err).__name__}: {err}', seconds=time.monotonic() - t0,
             traceback=traceback.format_exc()[-3000:])
    client = distributed.global_state.client   # the coordination service: no device collective
    if client is None:
      report('_barrier', error=f'the runtime is not initialised after {name}')
      return 4
    if self_init and name == checks[0][0]:
      _startup(begun, imported)
    try:
      client.wait_at_barrier(f'after-{name}', barrier_ms)
    except Exception as err:
      report('_barrier', error=f'not every process finished {name} within {barrier_ms} ms '
                               f'(stuck in a collective?): {type(err).__name__}: {err}')
      sys.stdout.flush()
      os._exit(3)
  report('_done', value=len(checks))
  if checks:
    try:
      client.wait_at_barrier('all-checks-done', barrier_ms)
    except Exception as err:
      report('_barrier', error=f'not every process finished: {type(err).__name__}: {err}')
      sys.stdout.flush()
      os._exit(3)
  sys.stdout.flush()
  sys.stderr.flush()
  # The others exit first; process 0, which hosts the coordination service, waits for them.
  if os.environ.get('PROCESS_ID') == '0':
    _linger(barrier_ms / 1000)
  else:   # a process slow to exit (a loaded machine); tests/test_multihost.py sets it
    time.sleep(float(os.environ.get('MESHSTATE_EXIT_DELAY_S', '0')))
  # Skip JAX's shutdown at exit: a collective that a failed check left pending (processes that
  # disagreed) would block it, and every result is already reported.
  os._exit(0)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1], sys.argv[2]))
