"""Plot the scaling results of bench/dispatch.py and bench/first_call.py into one PNG.

Reads bench/results/dispatch.json and bench/results/first_call.json (run those first) and saves
docs/bench_scaling.png: the per-call time in µs and its ratio to the hand-written
`jit(shard_map)` against the number of states, and the first-call time against the number of states.
Needs matplotlib (`pip install -e ".[bench]"`); without it, says so and exits 0.

  python bench/plot.py [--results bench/results] [--out docs/bench_scaling.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {'meshstate.pmap2': 'C0', 'jax.pmap': 'C1', 'jit(shard_map)': 'C2',
          'brainstate.pmap2': 'C3'}


def _load(folder: str, name: str) -> dict | None:
  path = os.path.join(folder, f'{name}.json')
  if not os.path.exists(path):
    print(f'plot: {path} is missing (run bench/{name}.py); its panel is left empty')
    return None
  with open(path) as f:
    return json.load(f)


def _series(rows, variant, y, **match):
  pts = sorted((r['states'], r[y]) for r in rows if r['variant'] == variant
               and r.get(y) is not None and all(r.get(k) == v for k, v in match.items()))
  return [p[0] for p in pts], [p[1] for p in pts]


def plot(folder: str, out: str) -> int:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('plot: matplotlib is not installed (pip install -e ".[bench]"); no plot written')
    return 0
  dispatch, first = _load(folder, 'dispatch'), _load(folder, 'first_call')
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  if dispatch:
    rows = dispatch['rows']
    for variant, marker in (('meshstate.pmap2', 'o'), ('jax.pmap', 's'), ('jit(shard_map)', '^')):
      for donated, line in (('yes', '-'), ('no', '--')):
        label = f'{variant}, donated={donated}'
        axes[0].plot(*_series(rows, variant, 'median_us', donated=donated), marker + line,
                     label=label, color=COLORS[variant], alpha=1 if donated == 'yes' else 0.6)
        if variant == 'jit(shard_map)':
          continue
        xs, mid = _series(rows, variant, 'ratio', donated=donated)
        lo = [m - q for m, q in zip(mid, _series(rows, variant, 'ratio_q1', donated=donated)[1])]
        hi = [q - m for m, q in zip(mid, _series(rows, variant, 'ratio_q3', donated=donated)[1])]
        axes[1].errorbar([x * (1.08 if donated == 'no' else 1) for x in xs], mid,
                         yerr=[lo, hi], fmt=marker + line, capsize=3, label=label,
                         color=COLORS[variant], alpha=1 if donated == 'yes' else 0.6)
    axes[0].set_yscale('log')
    axes[1].axhline(1.0, color='gray', lw=0.8)
  axes[0].set(title='per call (median of rounds)', ylabel='µs per call')
  axes[1].set(title='per-call time / jit(shard_map) (median, q1-q3)', ylabel='ratio')
  if first:
    for variant, style in (('meshstate.pmap2', 'o-'), ('jax.pmap', 's-'),
                           ('jit(shard_map)', '^-'), ('brainstate.pmap2', 'x:')):
      xs, ys = _series(first['rows'], variant, 'first_call_s')
      if xs:
        axes[2].plot(xs, ys, style, label=variant, color=COLORS[variant])
  axes[2].set(title='first call (trace + compile + run), fresh process', ylabel='seconds')
  for ax in axes:
    ax.set_xscale('log', base=2)
    ax.set_xlabel('number of states')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  meta = (dispatch or first or {}).get('meta', {})
  fig.suptitle(f'meshstate scaling: {meta.get("devices", "?")} {meta.get("platform", "")} '
               f'devices on {meta.get("cpus", "?")} cores, jax {meta.get("jax", "?")}')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f'wrote {os.path.relpath(out)}')
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--results', default=os.path.join(HERE, 'results'))
  p.add_argument('--out', default=os.path.join(os.path.dirname(HERE), 'docs',
                                               'bench_scaling.png'))
  args = p.parse_args(argv)
  return plot(args.results, args.out)


if __name__ == '__main__':
  sys.exit(main())
