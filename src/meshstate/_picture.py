"""A plain-text picture of which devices hold which block of an array (0-D to 2-D values)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

__all__ = ['draw']


def _device_ids(ids: list[int]) -> str:
  """`0-3,6` style text for sorted device ids: runs of three or more become ranges."""
  parts, start = [], 0
  while start < len(ids):
    stop = start
    while stop + 1 < len(ids) and ids[stop + 1] == ids[stop] + 1:
      stop += 1
    if stop - start >= 2:
      parts.append(f'{ids[start]}-{ids[stop]}')
    else:
      parts.extend(map(str, ids[start:stop + 1]))
    start = stop + 1
  return ','.join(parts)


def _header(title: str, value: Any) -> str:
  dtype = getattr(value, 'dtype', None)
  if dtype is None:
    what = type(value).__name__
  else:
    what = f'{dtype}[{",".join(map(str, np.shape(value)))}]'
  sharding = getattr(value, 'sharding', None)
  if isinstance(sharding, NamedSharding):
    spec = 'P(' + ', '.join(repr(e) for e in sharding.spec) + ')'
    mesh = ', '.join(f'{k}={v}' for k, v in sharding.mesh.shape.items())
    layout = f'  {spec}  mesh {mesh}'
  elif sharding is not None:
    layout = '  single device' if len(sharding.device_set) == 1 else f'  {type(sharding).__name__}'
  else:
    layout = ''
  return (f'{title}: ' if title else '') + what + layout


def _interval(index: tuple, dim: int, size: int) -> tuple[int, int]:
  s = index[dim] if dim < len(index) else slice(None)
  return (s.start or 0, size if s.stop is None else s.stop)


def _grid(value: Any) -> tuple[list, list, dict]:
  """Row and column intervals of the blocks, and the ids of the devices holding each block."""
  shape = tuple(np.shape(value))
  rows: list = [None]
  cols: list = [None]
  cells: dict[tuple, list[int]] = {}
  for device, index in value.sharding.devices_indices_map(shape).items():
    r = _interval(index, 0, shape[0]) if len(shape) == 2 else None
    c = _interval(index, len(shape) - 1, shape[-1]) if shape else None
    cells.setdefault((r, c), []).append(device.id)
  if len(shape) == 2:
    rows = sorted({r for r, _ in cells})
  if shape:
    cols = sorted({c for _, c in cells})
  return rows, cols, cells


def _label(interval: tuple[int, int] | None) -> str:
  return '' if interval is None else f'{interval[0]}:{interval[1]}'


def draw(title: str, value: Any) -> str:
  """The picture of one array (`title` names it in the first line)."""
  header = _header(title, value)
  if getattr(value, 'sharding', None) is None:
    if getattr(value, 'dtype', None) is None:
      return f'{header}\n  (a Python value: static to transforms, on no device)'
    return f'{header}\n  (a host array: on no device until a transform reads it)'
  if np.ndim(value) > 2:
    return (f'{header}\n  (a {np.ndim(value)}-D value: pictures are drawn for 0-D to 2-D values; '
            f'meshstate.sharding.describe gives its shard shape)')
  rows, cols, cells = _grid(value)
  text = {k: _device_ids(sorted(ids)) for k, ids in cells.items()}
  widths = [max(len(_label(c)), *(len(text.get((r, c), '')) for r in rows)) + 3 for c in cols]
  margin = max(len(_label(r)) for r in rows) + 1 if rows != [None] else 0
  border = ' ' * margin + '+' + '+'.join('-' * w for w in widths) + '+'
  lines = [header]
  if cols != [None]:
    lines.append((' ' * (margin + 1) + ' '.join((' ' + _label(c)).ljust(w)
                                                for c, w in zip(cols, widths))).rstrip())
  lines.append(border)
  for r in rows:
    cells_text = '|'.join((' ' + text.get((r, c), '-')).ljust(w) for c, w in zip(cols, widths))
    lines += [_label(r).ljust(margin) + '|' + cells_text + '|', border]
  if jax.process_count() > 1:
    by_process: dict[int, list[int]] = {}
    for device in value.sharding.device_set:
      by_process.setdefault(device.process_index, []).append(device.id)
    lines.append('processes: ' + '; '.join(f'p{p} holds {_device_ids(sorted(ids))}'
                                           for p, ids in sorted(by_process.items())))
  return '\n'.join(lines)
