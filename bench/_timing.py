"""Shared machinery of the benchmarks in bench/: devices, interleaved timing, tables, JSON.

Import this module before jax: `force_devices()` sets the simulated CPU device count then.
A benchmark builds `Case`s (a callable for one call, plus an optional check of the values it
left), runs them with `interleave` (shuffled round by round, so no variant always follows
another and the machine's drift cancels in each round's ratio), summarises them with
`summarize`, prints a table with `print_table` and writes JSON with `write_json`.
`Failures` collects a variant's exception instead of stopping the run; a script ends with
`failures.exit_code()`, so `--quick` fails loudly when a variant breaks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, 'results')
RESULT_LINE = '@@bench '   # prefix of a child process's JSON result line
_FORCE_FLAG = '--xla_force_host_platform_device_count'


def force_devices(n: int = 8) -> None:
  """Simulate `n` CPU devices unless jax is already imported or a platform is chosen."""
  if 'jax' not in sys.modules and not os.environ.get('JAX_PLATFORMS'):
    flags = os.environ.get('XLA_FLAGS', '')
    if _FORCE_FLAG not in flags:
      os.environ['XLA_FLAGS'] = f'{flags} {_FORCE_FLAG}={n}'.strip()


force_devices()


# -- arguments, failures -----------------------------------------------------------------------

def parser(doc: str, name: str) -> argparse.ArgumentParser:
  """An argument parser with the options every benchmark shares (`--quick`, `--out`, `--fail`)."""
  p = argparse.ArgumentParser(description=doc.split('\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='a few small cases, to check that every variant still runs')
  p.add_argument('--out', default=None,
                 help=f'JSON output (default bench/results/{name}.json, or '
                      f'bench/results/quick/{name}.json with --quick)')
  p.add_argument('--fail', default='', metavar='VARIANT',
                 help='make this variant raise (checks that a broken variant fails the run)')
  return p


def out_path(args: argparse.Namespace, name: str) -> str:
  if args.out:
    return args.out
  return os.path.join(RESULTS, 'quick', f'{name}.json') if args.quick else os.path.join(
      RESULTS, f'{name}.json')


class InjectedFailure(RuntimeError):
  """The failure `--fail VARIANT` injects."""


class Failures:
  """Exceptions of failed variants; a failed variant is reported and left out, the run goes on."""

  def __init__(self, inject: str = ''):
    self.inject = inject
    self.errors: list[tuple[str, str]] = []

  def guard(self, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, or None after recording its exception under `what`."""
    try:
      return fn()
    except Exception as err:   # a benchmark variant failing is data: report it and go on
      self.record(what, err)
      return None

  def record(self, what: str, err: BaseException | str) -> None:
    text = err if isinstance(err, str) else ''.join(
        traceback.format_exception(type(err), err, err.__traceback__)[-6:])
    self.errors.append((what, text))
    print(f'FAILED {what}:\n{text}', file=sys.stderr, flush=True)

  def wrap(self, variant: str, call: Callable[[], Any]) -> Callable[[], Any]:
    """`call`, or a call that raises when `--fail` names this variant."""
    if variant != self.inject:
      return call

    def broken():
      raise InjectedFailure(f'--fail {variant}')
    return broken

  def exit_code(self) -> int:
    if self.errors:
      print(f'{len(self.errors)} variant(s) failed: ' + ', '.join(w for w, _ in self.errors),
            file=sys.stderr)
    return 1 if self.errors else 0


# -- timing ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
  """One variant: `call()` runs one call and returns something to block on; `check(n)` raises
  if the values it left after `n` calls in all are wrong."""
  name: str
  call: Callable[[], Any]
  check: Callable[[int], None] | None = None
  calls_per_round: int | None = None   # None: the run's default
  calls_made: int = 0


def block(x: Any) -> Any:
  import jax
  return jax.block_until_ready(x)


def interleave(cases: Sequence[Case], rounds: int, calls: int, failures: Failures,
               warmup: int = 2, seed: int = 0, block_each: bool = False, label: str = '',
               target_s: float | None = None) -> dict[str, list[float]]:
  """Seconds per call of each case, one entry per round; cases that fail are dropped.

  Every round runs each case's `calls` calls (blocking at the end, or after every call with
  `block_each`) in a freshly shuffled order; the same `seed` gives the same order, so several
  processes running the same cases stay in step. With `target_s`, a round runs fewer calls
  (at least one) when `calls` calls of the median case would take longer than that.
  """
  live = []
  for case in cases:   # compile and warm up
    def warm(case=case):
      for _ in range(warmup):
        block(case.call())
        case.calls_made += 1
      return case
    if failures.guard(f'{label}{case.name} (first calls)', warm) is not None:
      live.append(case)
  if target_s and live:
    calls = max(1, min(calls, round(target_s / statistics.median(map(_one_call, live)))))
  times = {c.name: [] for c in live}
  rng = random.Random(seed)
  for _ in range(rounds):
    order = list(live)
    rng.shuffle(order)
    for case in order:
      if case.name not in times:
        continue
      n = case.calls_per_round or calls

      def run(case=case, n=n):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
          out = case.call()
          if block_each:
            block(out)
        block(out)
        return (time.perf_counter() - t0) / n
      t = failures.guard(f'{label}{case.name}', run)
      case.calls_made += n
      if t is None:
        del times[case.name]
      else:
        times[case.name].append(t)
  for case in live:
    if case.check is not None and case.name in times:
      if failures.guard(f'{label}{case.name} (values)',
                        lambda case=case: case.check(case.calls_made) or True) is None:
        del times[case.name]
  return times


def _one_call(case: Case) -> float:
  t0 = time.perf_counter()
  block(case.call())
  case.calls_made += 1
  return time.perf_counter() - t0


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
  if len(xs) < 2:
    return xs[0], xs[0], xs[0]
  q1, q2, q3 = statistics.quantiles(xs, n=4, method='inclusive')
  return q1, q2, q3


def summarize(times: dict[str, list[float]], baseline: str) -> list[dict]:
  """Per variant: median µs/call, overhead over the baseline in µs and as a ratio.

  The overhead and the ratio are medians over rounds of each round's difference and ratio (the
  baseline ran in the same round); `ratio_q1`/`ratio_q3` give their spread.
  """
  base = times.get(baseline)
  rows = []
  for name, ts in times.items():
    row = {'variant': name, 'median_us': statistics.median(ts) * 1e6, 'rounds': len(ts)}
    if base:
      ratios = [t / b for t, b in zip(ts, base)]
      q1, q2, q3 = quartiles(ratios)
      row.update(overhead_us=statistics.median(t - b for t, b in zip(ts, base)) * 1e6,
                 ratio=q2, ratio_q1=q1, ratio_q3=q3)
    rows.append(row)
  return rows


# -- output ------------------------------------------------------------------------------------

def meta(**extra: Any) -> dict:
  """The machine and versions a result was measured on (jax's devices only if jax is loaded)."""
  import importlib.metadata
  info = {'machine': platform.machine(), 'cpus': os.cpu_count(),
          'python': platform.python_version(),
          'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
          'time': time.strftime('%Y-%m-%d %H:%M:%S')}
  if 'jax' in sys.modules:
    import jax
    info.update(jax=jax.__version__, devices=jax.device_count(),
                platform=jax.devices()[0].platform)
  else:
    info['jax'] = importlib.metadata.version('jax')
  try:
    info['brainstate'] = importlib.metadata.version('brainstate')
  except importlib.metadata.PackageNotFoundError:
    pass
  info.update(extra)
  return info


def fmt(value: Any, spec: str) -> str:
  if value is None:
    return '-'
  if isinstance(value, str):
    return value
  return format(value, spec)


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
  """Rows as an aligned table; `columns` are (key, heading, format spec)."""
  cells = [[fmt(r.get(k), spec) for k, _, spec in columns] for r in rows]
  widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
  print('  '.join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
  for c in cells:
    print('  '.join(v.rjust(w) for v, w in zip(c, widths)))
  sys.stdout.flush()


def write_json(path: str, rows: Any, info: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'meta': info, 'rows': rows}, f, indent=2)
  print(f'wrote {os.path.relpath(path)}')


def run(args: argparse.Namespace, name: str,
        measure: Callable[[argparse.Namespace, 'Failures'], list[dict]],
        columns: Sequence[tuple[str, str, str]], **info: Any) -> int:
  """Measure, print the table, write the JSON (`meta` taken after measuring, with `info`).

  Returns the exit status: non-zero when a variant failed.
  """
  failures = Failures(args.fail)
  rows = measure(args, failures)
  print_table(rows, columns)
  write_json(out_path(args, name), rows, meta(quick=args.quick, **info))
  return failures.exit_code()


# -- processes and memory ----------------------------------------------------------------------

def report(**record: Any) -> None:
  """A child process's result: one JSON line on stdout."""
  print(RESULT_LINE + json.dumps(record), flush=True)


def results(stdout: str) -> list[dict]:
  return [json.loads(line[len(RESULT_LINE):]) for line in stdout.splitlines()
          if line.startswith(RESULT_LINE)]


def child_env(extra: dict | None = None) -> dict:
  """This process's environment, with `src` first on PYTHONPATH."""
  env = dict(os.environ)
  path = [os.path.join(ROOT, 'src')] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                                         if p]
  env['PYTHONPATH'] = os.pathsep.join(path)
  env.update(extra or {})
  return env


def run_child(argv: Sequence[str], timeout: float, env: dict | None = None) -> list[dict]:
  """Run `python *argv` (a fresh process) and return its result lines; raise if it fails."""
  proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                        timeout=timeout, env=env or child_env(), cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f'{" ".join(argv)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}')
  return results(proc.stdout)


def _status_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def rss_bytes() -> int | None:
  """Resident memory of this process now (Linux), else None."""
  try:
    return _status_kib('VmRSS') * 1024
  except (OSError, KeyError):
    return None


def reset_peak_rss() -> bool:
  """Restart the peak-RSS counter (Linux: /proc/self/clear_refs); False where not possible."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int | None:
  try:
    return _status_kib('VmHWM') * 1024
  except (OSError, KeyError):
    return None


def live_arrays() -> tuple[int, int]:
  """Number and total bytes of the jax.Arrays alive now."""
  import jax
  arrays = jax.live_arrays()
  return len(arrays), sum(a.nbytes for a in arrays)
