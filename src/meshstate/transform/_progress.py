"""Progress of long `for_loop`/`scan` runs, reported from the device with `jax.debug.callback`."""
from __future__ import annotations

import importlib.util
import sys
import threading
import warnings
from typing import Any, TextIO

import jax
import jax.numpy as jnp
from jax import lax

from meshstate._compat import bound_axis_names
from meshstate._errors import user_stacklevel

__all__ = ['ProgressBar', 'progress_runner']


class ProgressBar:
  """How `for_loop`/`scan` show their progress while they run (their `pbar=` argument).

  The loop calls back to the host every `freq` steps (`jax.debug.callback`, so it works inside
  `jit`, `pmap2`, `vmap2` and `grad`); the host draws a `tqdm` bar when tqdm is installed and
  prints plain `desc: done/total` lines otherwise. Inside a mapped body only the first device
  (or lane) reports. `pbar=N` (an int) means `ProgressBar(freq=N)`; `pbar=True` the defaults.
  A body mapped over some axes of an Explicit-axis mesh cannot call the host (JAX has no
  callback there): the loop then runs without its bar, with a warning.

  Args:
    freq: report every `freq` steps (default: about 20 reports over the loop).
    count: report this many times instead (not with `freq`).
    desc: text shown before the counter (default `'Running N steps'`).
    file: where to write (default `sys.stderr`).
    tqdm: use tqdm (True), plain text (False), or tqdm when installed (None).

  Example:
    >>> import sys, jax, jax.numpy as jnp, meshstate
    >>> from meshstate.transform import ProgressBar, for_loop
    >>> bar = ProgressBar(freq=2, desc='steps', file=sys.stdout, tqdm=False)
    >>> ys = for_loop(lambda x: x * 2, jnp.arange(4.), pbar=bar); jax.effects_barrier()
    steps: 2/4
    steps: 4/4
  """

  def __init__(self, freq: int | None = None, count: int | None = None, desc: str | None = None,
               file: TextIO | None = None, tqdm: bool | None = None):
    if freq is not None and count is not None:
      raise ValueError(f'ProgressBar takes freq= or count=, not both (got freq={freq}, '
                       f'count={count}).')
    for name, value in (('freq', freq), ('count', count)):
      if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                or value < 1):
        raise ValueError(f'ProgressBar {name}= must be a positive int, got {value!r}.')
    self.freq, self.count, self.desc, self.file = freq, count, desc, file
    self.tqdm = importlib.util.find_spec('tqdm') is not None if tqdm is None else tqdm

  def _every(self, n: int) -> int:
    if self.freq is not None:
      return min(self.freq, max(n, 1))
    if self.count is not None:
      return max(n // self.count, 1)
    return max(n // 20, 1)

  def __repr__(self) -> str:
    return f'ProgressBar(freq={self.freq}, count={self.count}, desc={self.desc!r})'


def _as_bar(pbar: Any) -> ProgressBar | None:
  if pbar is None or pbar is False:
    return None
  if pbar is True:
    return ProgressBar()
  if isinstance(pbar, int):
    return ProgressBar(freq=pbar)
  if isinstance(pbar, ProgressBar):
    return pbar
  raise TypeError(f'pbar must be None, an int (report every N steps) or a ProgressBar, got '
                  f'{type(pbar).__name__}.')


class _Runner:
  """One traced loop's progress: `tick(i)` in the body, drawing on the host."""

  def __init__(self, bar: ProgressBar, n: int):
    self.bar, self.n, self.every = bar, n, bar._every(n)
    self.desc = bar.desc if bar.desc is not None else f'Running {n:,} steps'
    self._lock = threading.Lock()
    self._shown = 0      # steps shown in the current run
    self._tqdm = None

  def tick(self, i: Any) -> None:
    """Report after step `i` (0-based, traced) when it ends a block of `every` steps."""
    if _no_callbacks_here():
      warnings.warn('A ProgressBar cannot report from a pmap2/shard_map body over some axes of '
                    'an Explicit-axis mesh: JAX has no host callback there. The loop runs '
                    'without it; give the mesh Auto axes, or map over all of them, to see it.',
                    stacklevel=user_stacklevel())
      return
    done = i + 1
    first = jnp.asarray(True)
    for name in bound_axis_names():   # no public query of the axis environment
      first = first & (lax.axis_index(name) == 0)
    due = (done % self.every == 0) | (done == self.n)
    lax.cond(due, lambda d, f: jax.debug.callback(self._show, d, f),
             lambda d, f: None, done, first)

  def _show(self, done: Any, first: Any) -> None:
    if not bool(first):
      return
    done = int(done)
    with self._lock:
      if done <= self._shown:
        if self._shown < self.n:
          return          # a repeat (an unnamed vmap lane) of a report already shown
        self._shown = 0   # the loop runs again
      self._draw(done)
      self._shown = done

  def _draw(self, done: int) -> None:
    file = self.bar.file if self.bar.file is not None else sys.stderr
    if not self.bar.tqdm:
      print(f'{self.desc}: {done}/{self.n}', file=file, flush=True)
      return
    if self._tqdm is None:
      from tqdm.auto import tqdm
      self._tqdm = tqdm(total=self.n, desc=self.desc, file=file)
    self._tqdm.update(done - self._tqdm.n)
    if done >= self.n:
      self._tqdm.close()
      self._tqdm = None


def _no_callbacks_here() -> bool:
  """Whether the trace is in a shard_map body that leaves some Explicit mesh axes free."""
  types = set(jax.sharding.get_abstract_mesh().axis_types)
  return jax.sharding.AxisType.Manual in types and jax.sharding.AxisType.Explicit in types


def progress_runner(pbar: Any, n: int) -> _Runner | None:
  """The runner of one traced loop of `n` steps for a `pbar=` argument (None: no progress)."""
  bar = _as_bar(pbar)
  return None if bar is None or n == 0 else _Runner(bar, n)
