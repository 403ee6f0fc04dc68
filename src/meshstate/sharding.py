"""See how states are laid out on a mesh: `describe` tables and `explain` for mapped calls."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from meshstate._state import State
from meshstate.transform._axes import entry_axes

__all__ = ['describe', 'StateTable', 'Explanation', 'format_spec']

COLUMNS = ('path', 'type', 'shape', 'dtype', 'spec', 'mesh_axes', 'shard_shape',
           'bytes_per_device', 'replicated')


def format_spec(spec: Any) -> str:
  """`P('data', None)` style text for a `PartitionSpec` (or '-' for None).

  Args:
    spec: a `jax.sharding.PartitionSpec`, or None.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> from meshstate.sharding import format_spec
    >>> format_spec(P('data', None)), format_spec(None)
    ("P('data', None)", '-')
  """
  if spec is None:
    return '-'
  return 'P(' + ', '.join(repr(e) for e in spec) + ')'


def _state_row(path: str, state: State, check_values: bool) -> dict:
  """The row of one state; a pytree value gets per-array cells in its own structure."""
  leaves, treedef = jax.tree.flatten(state._value)
  rows = [_row(path, type(state).__name__, leaf, check_values) for leaf in leaves]
  if len(rows) == 1 and treedef.num_nodes == 1:
    return rows[0]
  merged: dict[str, Any] = {'path': path, 'type': type(state).__name__}
  extra = (('processes',) if jax.process_count() > 1 else ()) + (('note',) if check_values else ())
  for column in COLUMNS[2:] + extra:
    cells = [r[column] for r in rows]
    if column == 'bytes_per_device':
      merged[column] = sum(cells)
    elif column == 'replicated':
      merged[column] = all(cells)
    else:
      merged[column] = treedef.unflatten(cells)
  return merged


def _row(path: str, type_name: str, value: Any, check_values: bool) -> dict:
  dtype = getattr(value, 'dtype', None) or np.result_type(value)
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(value)   # typed keys: measure the key data they hold
    itemsize = data.dtype.itemsize * math.prod(data.shape[np.ndim(value):])
  else:
    itemsize = np.dtype(dtype).itemsize
  sharding = getattr(value, 'sharding', None)
  shape = tuple(np.shape(value))
  row = {'path': path, 'type': type_name, 'shape': shape, 'dtype': str(dtype)}
  if isinstance(sharding, NamedSharding):
    spec = sharding.spec
    row['spec'] = format_spec(spec)
    row['mesh_axes'] = {d: entry_axes(e) for d, e in enumerate(spec) if e is not None}
  else:
    row['spec'] = 'single device' if sharding is not None else '-'
    row['mesh_axes'] = {}
  if sharding is not None:
    row['shard_shape'] = tuple(sharding.shard_shape(shape))
    per_device: dict[Any, int] = {}
    for shard in value.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + math.prod(
          _index_shape(shard.index, shape)) * itemsize
    row['bytes_per_device'] = max(per_device.values())
    row['replicated'] = bool(sharding.is_fully_replicated)
  else:
    row['shard_shape'] = shape
    row['bytes_per_device'] = math.prod(shape) * itemsize
    row['replicated'] = True
  if jax.process_count() > 1:
    row['processes'] = _owners(value, shape) if sharding is not None else 'this process'
  if check_values:
    row['note'] = _same_on_every_shard(value, row['mesh_axes'])
  return row


def _index_shape(index: tuple, shape: tuple) -> tuple:
  return tuple(len(range(*i.indices(n))) if isinstance(i, slice) else 1
               for i, n in zip(index + (slice(None),) * (len(shape) - len(index)), shape))


def _same_on_every_shard(value: Any, mesh_axes: dict) -> str:
  # Old pmap code stacks a copy per device; flag dimensions whose slices are all equal.
  if not mesh_axes or jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    return ''
  same = [d for d in mesh_axes if value.shape[d] > 1 and _stacked_along(value, d)]
  if not same:
    return ''
  return (f'same value on every slice of dim {", ".join(map(str, same))}: stored stacked per '
          f'device, could be replicated')


def _stacked_along(value: Any, dim: int) -> bool:
  """Whether every slice of `value` along `dim` is the same.

  Compares this process's shards on their devices; only one boolean comes to the host, and
  nothing is fetched from other processes.
  """
  shards = value.addressable_shards
  first = shards[0].data
  ref = jax.lax.index_in_dim(first, 0, dim, keepdims=True)
  region = lambda s: tuple(i for d, i in enumerate(_index_key(s.index, value.ndim))  # noqa
                           if d != dim)
  ref_region = region(shards[0])
  checks = [jax.numpy.all(s.data == jax.device_put(ref, s.device)) for s in shards
            if region(s) == ref_region]
  others = [s for s in shards if region(s) != ref_region]
  return all(map(bool, checks)) and not others


def _index_key(index: tuple, ndim: int) -> tuple:
  full = index + (slice(None),) * (ndim - len(index))
  return tuple((i.start, i.stop) if isinstance(i, slice) else i for i in full)


def _owners(value: Any, shape: tuple) -> str:
  """Which process holds which shard: `p0 [0:4, :] | p1 [4:8, :]` (no data is fetched)."""
  by_process: dict[int, list[str]] = {}
  for device, index in value.sharding.devices_indices_map(shape).items():
    text = '[' + ', '.join(f'{i.start or 0}:{n if i.stop is None else i.stop}'
                           if isinstance(i, slice) and (i.start or i.stop) else ':'
                           for i, n in zip(index, shape)) + ']'
    cells = by_process.setdefault(device.process_index, [])
    if text not in cells:
      cells.append(text)
  return ' | '.join(f'p{p} {" ".join(c)}' for p, c in sorted(by_process.items()))


def _named_states(obj: Any) -> list[tuple[str, State]]:
  from meshstate.nn import Module
  if isinstance(obj, State):
    return [('', obj)]
  if isinstance(obj, Module):
    return [('.'.join(map(str, p)), s) for p, s in obj.states().items()]
  if hasattr(obj, 'touched_states') and hasattr(obj, 'state_paths'):   # a mapping
    paths = obj.state_paths()
    return [('.'.join(map(str, paths[s])) if s in paths else f'<{type(s).__name__} {i}>', s)
            for i, s in enumerate(obj.touched_states())]
  if isinstance(obj, dict):
    return [(str(k), s) for k, s in obj.items()]
  if isinstance(obj, Iterable):
    return [(str(i), s) for i, s in enumerate(obj)]
  raise TypeError(f'describe takes a Module, a StatefulMapping, a dict or an iterable of '
                  f'States, got {type(obj).__name__}.')


@dataclasses.dataclass
class StateTable:
  """One row per state: `rows` is a list of plain dicts; `str()` aligns them for a terminal.

  Made by `describe`. Each row has the keys `path`, `type`, `shape`, `dtype`, `spec`,
  `mesh_axes`, `shard_shape`, `bytes_per_device` and `replicated` (and `processes`, `note`
  where they apply).

  Args:
    rows: the rows, one plain dict per state.
  """
  rows: list[dict]

  def __str__(self) -> str:
    if not self.rows:
      return '(no states)'
    columns = [c for c in (*COLUMNS, 'processes', 'note') if c in self.rows[0]]
    cells = [[_cell(c, row[c]) for c in columns] for row in self.rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda items: '  '.join(s.ljust(w) for s, w in zip(items, widths)).rstrip()  # noqa
    return '\n'.join([line(columns), line('-' * w for w in widths), *map(line, cells)])

  def __repr__(self) -> str:
    return str(self)


def _cell(column: str, value: Any) -> str:
  if column == 'mesh_axes' and all(isinstance(d, int) for d in value):
    return ', '.join(f'{d}:{"+".join(map(str, a))}' for d, a in value.items()) or '-'
  if isinstance(value, tuple):
    return str(value).replace(' ', '')
  return str(value)   # a pytree-valued state: the cell's leaves in the value's structure


def describe(obj: Any, check_values: bool = False) -> StateTable:
  """Tabulate how each state of `obj` is laid out: spec, mesh axes, shard shape, bytes.

  `obj` is a Module, a StatefulMapping (the states it touched), a dict of states or an
  iterable of states. With `check_values=True`, a `note` column flags states that are sharded
  but hold the same value on every shard (stacked copies that could be replicated).

  Args:
    obj: a `Module`, a `StatefulMapping` (the states it has touched), a `{name: State}` dict,
      or an iterable of `State`s.
    check_values: also compare the shards of each sharded state and flag those that hold the
      same value on every shard.

  Returns:
    A `StateTable`: `str()` prints it, `.rows` holds its rows as dicts.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> table = meshstate.sharding.describe({'w': meshstate.ParamState(jnp.zeros((2, 3)))})
    >>> table.rows[0]['shape'], table.rows[0]['bytes_per_device']
    ((2, 3), 24)
  """
  return StateTable([_state_row(path, state, check_values)
                     for path, state in _named_states(obj)])


@dataclasses.dataclass
class Explanation:
  """What a mapped call runs, as text and as a hand-written program.

  `str()` (and the REPL or notebook display) is the text; `code` is the hand-written program,
  which runs with `exec(code, namespace)` and leaves its result in `namespace['result']`.
  Made by `StatefulMapping.explain`.

  Args:
    text: the description: the mesh, the in/out specs, the hand-written program.
    code: the hand-written `jax.jit(jax.shard_map(...))` program, as Python source.
    namespace: the names `code` runs with (the arguments, the state values, the function).
    mesh: the `jax.sharding.Mesh` the program runs on.
    in_specs: the `PartitionSpec`s of the arguments, then of the states read.
    out_specs: the `PartitionSpec`s of the outputs, then of the states written.
    check_vma: the `check_vma` the program runs `jax.shard_map` with.
  """
  text: str
  code: str
  namespace: dict
  mesh: Any
  in_specs: tuple
  out_specs: tuple
  check_vma: bool = False

  def __str__(self) -> str:
    return self.text

  __repr__ = __str__

  def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
    printer.text(self.text)

  def run(self) -> Any:
    """Execute `code` in (a copy of) `namespace`: the call's outputs, with its states written."""
    namespace = dict(self.namespace)
    exec(self.code, namespace)
    return namespace['result']


def _tuple_text(items: Iterable[str]) -> str:
  return '(' + ''.join(f'{x}, ' for x in items) + ')'


def _program_code(plan: Any) -> list[str]:
  """The lines that build `program` the way the engine built `plan.fn`."""
  jit_kwargs = f', donate_argnums={plan.donate}' if plan.donate else ''
  pinned = any(s is not None for s in plan.out_shardings)
  if plan.kind == 'vmap':
    return [
        'mapped = jax.vmap(',
        '    block_fn,',
        f'    in_axes={tuple(plan.in_layouts)!r},',
        f'    out_axes={tuple(plan.out_layouts)!r},',
        f'    axis_name={plan.axis_name!r}, axis_size={plan.size},',
        f'    spmd_axis_name={plan.spmd_axis_name!r})',
        '# lanes are split over the devices of `mesh`; in/out_shardings put them there',
        'program = jax.jit(lambda *slots: pin(mapped(*pin(slots, in_shardings)), out_shardings)'
        f'{jit_kwargs})',
    ]
  lines = [
      'mapped = jax.shard_map(',
      '    block_fn, mesh=mesh,',
      f'    in_specs={_tuple_text(map(format_spec, plan.in_specs))},',
      f'    out_specs={_tuple_text(map(format_spec, plan.out_specs))},',
      f'    axis_names={set(plan.manual)!r}, check_vma={plan.check_vma})',
  ]
  call = 'mapped(*slots)'
  if plan.fit is not None:
    lines.append('# Explicit-axis mesh: inputs are first resharded to in_specs on the manual axes')
    call = 'mapped(*fit(*slots))'
  if pinned:
    lines.append('# written states keep their layout over the other mesh axes: out_shardings')
    call = f'pin({call}, out_shardings)'
  if plan.in_shardings:
    lines.append('# inputs are first moved to the mesh: in_shardings')
    jit_kwargs += ', in_shardings=in_shardings'
  return lines + [f'program = jax.jit(lambda *slots: {call}{jit_kwargs})']


def explain_plan(plan: Any, leaves: list, vals: list, in_names: list[str],
                 out_names: list[str]) -> Explanation:
  """The `Explanation` of one `Plan` of a mesh mapping, for these argument leaves and states."""
  from meshstate.transform._mappers import constrain
  mesh = plan.mesh
  in_avals = [jax.tree.map(jax.typeof, v) for v in (*leaves, *vals)]
  width = max(map(len, in_names + out_names), default=0) + 2
  in_layouts = plan.in_specs if plan.kind == 'shard_map' else plan.in_shardings
  out_layouts = plan.out_specs if plan.kind == 'shard_map' else plan.out_shardings
  text = lambda x: format_spec(getattr(x, 'spec', x))  # noqa: E731
  lines = [f'mesh: {dict(mesh.shape)} (axis types {tuple(t.name for t in mesh.axis_types)}), '
           f'manual axes: {sorted(plan.manual)}, check_vma={plan.check_vma}',
           'in_specs (arguments, then states read):']
  lines += [f'  {n.ljust(width)}{text(s).ljust(24)}{a}'
            for n, s, a in zip(in_names, in_layouts, in_avals)]
  lines.append('out_specs (outputs, then states written):')
  lines += [f'  {n.ljust(width)}{text(s)}' for n, s in zip(out_names, out_layouts)]
  code = _program_code(plan) + [
      'outs = program(*arg_leaves, *[s.value for s in states_read])',
      'for s, v in zip(states_written, outs[n_out:]):',
      '  s.value = v',
  ]
  if plan.static_writes:
    code += ['for s, v in static_writes:   # states set to Python values', '  s.value = v']
  code.append('result = out_tree.unflatten(outs[:n_out])')
  lines += ['equivalent hand-written program (block_fn: the function on per-device blocks):',
            *('  ' + c for c in code)]
  namespace = {'jax': jax, 'P': jax.sharding.PartitionSpec, 'mesh': mesh,
               'block_fn': plan.block_fn, 'fit': plan.fit, 'pin': constrain,
               'in_shardings': plan.in_shardings, 'out_shardings': plan.out_shardings,
               'arg_leaves': list(leaves), 'states_read': list(plan.in_states),
               'states_written': list(plan.out_states), 'static_writes': plan.static_writes,
               'n_out': plan.n_out, 'out_tree': plan.out_tree}
  return Explanation('\n'.join(lines), '\n'.join(code), namespace, mesh, tuple(in_layouts),
                     tuple(out_layouts), plan.check_vma)
