"""Run every benchmark in bench/ (`--quick`: a small case of each, as .ci/run does).

Runs dispatch, lanes, soak, memory, first_call and multihost one after the other, then, without
--quick, the plot. Each runs in its own fresh process; with --quick they share this one (jax
loads once), and first_call and multihost still start their own. Exits non-zero when any
variant of any benchmark failed (raised, or left wrong values).

  python bench/all.py [--quick] [--only dispatch,lanes] [--fail VARIANT]
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback

import _timing as T   # first: sets the simulated device count before jax loads

BENCHMARKS = ('dispatch', 'lanes', 'soak', 'memory', 'first_call', 'multihost')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true')
  p.add_argument('--only', default=','.join(BENCHMARKS))
  p.add_argument('--fail', default='', metavar='VARIANT',
                 help='make this variant raise in every benchmark that has it')
  args = p.parse_args(argv)
  status = {}
  for name in args.only.split(','):
    print(f'== bench/{name}.py{" --quick" if args.quick else ""}', flush=True)
    t0 = time.perf_counter()
    flags = (['--quick'] if args.quick else []) + (['--fail', args.fail] if args.fail else [])
    if not args.quick:   # a clean process: no other benchmark's programs or arrays around
      code = subprocess.run([sys.executable, os.path.join(T.HERE, f'{name}.py'), *flags],
                            env=T.child_env()).returncode
    else:
      try:
        code = importlib.import_module(name).main(flags)
      except (Exception, SystemExit) as err:   # one broken benchmark must not hide the others
        traceback.print_exc()
        code = err.code if isinstance(err, SystemExit) and err.code else 1
    status[name] = (code, time.perf_counter() - t0)
  if not args.quick and set(args.only.split(',')) >= {'dispatch', 'first_call'}:
    importlib.import_module('plot').main([])
  print('== summary')
  for name, (code, seconds) in status.items():
    print(f'{name:>12}: {"ok" if code == 0 else f"FAILED ({code})"}  {seconds:.1f} s')
  return 1 if any(code for code, _ in status.values()) else 0


if __name__ == '__main__':
  sys.exit(main())
