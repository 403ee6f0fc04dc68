"""See how states are laid out on a mesh: `describe` tables, `visualize` pictures, `explain`."""
from __future__ import annotations

import dataclasses
import html
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from meshstate._picture import draw
from meshstate._state import State
from meshstate.transform._axes import entry_axes

__all__ = ['describe', 'visualize', 'StateTable', 'Explanation', 'format_spec']

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


def _leaf_key(key: Any) -> str:
  """One step of a pytree path as text: a dict key, an attribute name or an index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaves(path: str, value: Any) -> list[tuple[str, Any]]:
  """`(path, leaf)` for each array of a state's value; a pytree's leaves get dotted paths."""
  found = jax.tree_util.tree_flatten_with_path(value)[0]
  return [('.'.join(p for p in (path, *map(_leaf_key, keys)) if p), leaf)
          for keys, leaf in found]


def _state_rows(path: str, state: State, check_values: bool) -> list[tuple[dict, dict, int]]:
  """One `(row, bytes by device, global bytes)` per leaf of the state's value."""
  leaves = _leaves(path, state._value)
  if not leaves:   # None or an empty container: one row that says so
    row = {'path': path, 'type': type(state).__name__, 'shape': (), 'dtype': '-', 'spec': '-',
           'mesh_axes': {}, 'shard_shape': (), 'bytes_per_device': 0, 'replicated': True}
    if jax.process_count() > 1:
      row['processes'] = 'this process'
    if check_values:
      row['note'] = ''
    return [(row, {}, 0)]
  return [_row(p, type(state).__name__, leaf, check_values) for p, leaf in leaves]


def _dtype_and_itemsize(value: Any) -> tuple[Any, int]:
  """The dtype of an array leaf and the bytes of one element (a typed key: its key data)."""
  dtype = getattr(value, 'dtype', None)
  if dtype is None:
    if not isinstance(value, (bool, int, float, complex, np.generic)):
      return type(value).__name__, 0   # a Python object held by a static state: no device bytes
    dtype = np.result_type(value)
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(value)   # pyright: ignore[reportArgumentType] (a typed key)
    return dtype, data.dtype.itemsize * math.prod(data.shape[np.ndim(value):])
  return dtype, np.dtype(dtype).itemsize


def _row(path: str, type_name: str, value: Any, check_values: bool) -> tuple[dict, dict, int]:
  dtype, itemsize = _dtype_and_itemsize(value)
  sharding = getattr(value, 'sharding', None)
  shape = tuple(np.shape(value)) if itemsize else ()
  nbytes = math.prod(shape) * itemsize
  row = {'path': path, 'type': type_name, 'shape': shape, 'dtype': str(dtype)}
  if isinstance(sharding, NamedSharding):
    spec = sharding.spec
    row['spec'] = format_spec(spec)
    row['mesh_axes'] = {d: entry_axes(e) for d, e in enumerate(spec) if e is not None}
  else:
    row['spec'] = 'single device' if sharding is not None else '-'
    row['mesh_axes'] = {}
  per_device: dict[Any, int] = {}
  if sharding is not None:
    row['shard_shape'] = tuple(sharding.shard_shape(shape))
    for device, index in sharding.devices_indices_map(shape).items():   # metadata, no data
      per_device[device] = per_device.get(device, 0) + math.prod(
          _index_shape(index, shape)) * itemsize
    row['bytes_per_device'] = max(per_device.values())
    row['replicated'] = bool(sharding.is_fully_replicated)
  else:   # a host value: every device holds a copy once a transform reads it
    row['shard_shape'] = shape
    row['bytes_per_device'] = nbytes
    row['replicated'] = True
  if jax.process_count() > 1:
    row['processes'] = _owners(value, shape) if sharding is not None else 'this process'
  if check_values:
    row['note'] = _same_on_every_shard(value, row['mesh_axes']) if sharding is not None else ''
  return row, (per_device if sharding is not None else {None: nbytes}), nbytes


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


def _totals(n_states: int, parts: list[tuple[dict, dict, int]]) -> dict:
  """States, the most bytes one device holds over all of them, and their global bytes."""
  by_device: dict[Any, int] = {}
  everywhere = 0   # host values: a copy on every device once read
  for _, per_device, _ in parts:
    for device, nbytes in per_device.items():
      if device is None:
        everywhere += nbytes
      else:
        by_device[device] = by_device.get(device, 0) + nbytes
  return {'states': n_states, 'arrays': len(parts),
          'bytes_per_device': max(by_device.values(), default=0) + everywhere,
          'bytes_global': sum(nbytes for _, _, nbytes in parts)}


@dataclasses.dataclass
class StateTable:
  """One row per array (each leaf of a pytree-valued state), and the totals over all states.

  `rows` is a list of plain dicts; `totals` a dict with `states` (how many states), `arrays`
  (how many rows), `bytes_per_device` (the most bytes any one device holds of all these states
  together) and `bytes_global` (the states' sizes summed, each counted once however many
  devices hold a copy). `str()` aligns the rows for a terminal and ends with a totals line;
  notebooks show an HTML table (`_repr_html_`).

  Args:
    rows: one dict per array, with the keys of `COLUMNS` (and `processes`/`note` when shown).
    totals: the totals over all states, as described above.
  """
  rows: list[dict]
  totals: dict = dataclasses.field(default_factory=dict)

  def _columns(self) -> list[str]:
    return [c for c in (*COLUMNS, 'processes', 'note') if c in self.rows[0]]

  def _total_text(self) -> str:
    t = self.totals
    if not t:
      return ''
    return (f"total: {t['states']} state{'s' * (t['states'] != 1)}, {t['arrays']} "
            f"array{'s' * (t['arrays'] != 1)}, {t['bytes_per_device']} bytes per device "
            f"(the most any one device holds), {t['bytes_global']} bytes overall")

  def __str__(self) -> str:
    if not self.rows:
      return '(no states)'
    columns = self._columns()
    cells = [[_cell(c, row[c]) for c in columns] for row in self.rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda items: '  '.join(s.ljust(w) for s, w in zip(items, widths)).rstrip()  # noqa
    lines = [line(columns), line('-' * w for w in widths), *map(line, cells)]
    return '\n'.join(lines + [self._total_text()] * bool(self.totals))

  def __repr__(self) -> str:
    return str(self)

  def _repr_html_(self) -> str:
    if not self.rows:
      return '<p>(no states)</p>'
    columns = self._columns()
    head = ''.join(f'<th>{html.escape(c)}</th>' for c in columns)
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(_cell(c, row[c]))}</td>' for c in columns)
                   + '</tr>' for row in self.rows)
    foot = (f'<tfoot><tr><td colspan="{len(columns)}">{html.escape(self._total_text())}'
            f'</td></tr></tfoot>' if self.totals else '')
    return (f'<table class="meshstate-describe"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody>{foot}</table>')


def _cell(column: str, value: Any) -> str:
  if column == 'mesh_axes':
    return ', '.join(f'{d}:{"+".join(map(str, a))}' for d, a in value.items()) or '-'
  if isinstance(value, tuple):
    return str(value).replace(' ', '')
  return str(value)


def describe(obj: Any, check_values: bool = False) -> StateTable:
  """Tabulate how each state of `obj` is laid out: spec, mesh axes, shard shape, bytes.

  `obj` is a Module, a StatefulMapping (the states it touched), a dict of states or an
  iterable of states. A state whose value is a pytree (an optimizer state, a dict) gets one row
  per array, its path extended by the array's place in the pytree (`opt.mu.w`). The table's
  `totals` (also its last printed line) give the number of states, the most bytes any one
  device holds of them all, and their global size. With `check_values=True`, a `note` column
  flags arrays that are sharded but hold the same value on every shard (stacked copies that
  could be replicated); the shards are compared on their devices. Nothing is ever fetched
  from another process; with several processes a `processes` column says which holds what.

  Args:
    obj: a `Module`, a `StatefulMapping` (the states it has touched), a `{name: State}` dict,
      or an iterable of `State`s.
    check_values: also compare the shards of each sharded state and flag those that hold the
      same value on every shard.

  Returns:
    A `StateTable`: `str()` prints it, `.rows` holds its rows as dicts.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> opt = meshstate.State({'mu': jnp.zeros(3), 'nu': jnp.zeros(3)})
    >>> table = meshstate.sharding.describe({'w': meshstate.ParamState(jnp.zeros((2, 3))),
    ...                                      'opt': opt})
    >>> [(r['path'], r['shape'], r['bytes_per_device']) for r in table.rows]
    [('w', (2, 3), 24), ('opt.mu', (3,), 12), ('opt.nu', (3,), 12)]
    >>> table.totals
    {'states': 2, 'arrays': 3, 'bytes_per_device': 48, 'bytes_global': 48}
  """
  named = _named_states(obj)
  parts = [part for path, state in named for part in _state_rows(path, state, check_values)]
  return StateTable([row for row, _, _ in parts], _totals(len(named), parts))


def visualize(obj: Any) -> str:
  """A text picture of which devices hold which block of each array, for 0-D to 2-D values.

  `obj` is one `State` or `jax.Array`, or anything `describe` takes (a Module, a
  StatefulMapping, a dict or an iterable of states): one picture per array, each leaf of a
  pytree-valued state included, like `jax.debug.visualize_array_sharding` but as plain text.
  A grid cell is one block of the array (its index ranges label the rows and columns) and
  lists the ids of the devices that hold it. Only layout metadata is read: no data moves, and
  nothing is fetched from other processes. Returns the text; print it to see it.

  Args:
    obj: a `State`, a `jax.Array`, a Module, a StatefulMapping, a dict of states or an
      iterable of states.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, meshstate
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
    >>> w = jax.device_put(jnp.zeros((4, 8)), NamedSharding(mesh, P(None, 'model')))
    >>> print(meshstate.sharding.visualize({'w': meshstate.ParamState(w)}))
    w: float32[4,8]  P(None, 'model')  mesh data=2, model=4
          0:2    2:4    4:6    6:8
        +------+------+------+------+
    0:4 | 0,4  | 1,5  | 2,6  | 3,7  |
        +------+------+------+------+
  """
  if isinstance(obj, jax.Array):
    return draw('', obj)
  pictures = []
  for name, state in _named_states(obj):
    leaves = _leaves(name, state._value)
    pictures += [draw(path or type(state).__name__, leaf) for path, leaf in leaves]
    if not leaves:
      pictures.append(f'{name or type(state).__name__}: {state._value!r} (no arrays)')
  return '\n\n'.join(pictures)


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
        'def run(*slots):',
        '  # under the mesh: vmap batches what it makes (axis_index, lane keys) over its axes',
        '  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):',
        '    return pin(mapped(*pin(slots, in_shardings)), out_shardings)',
        f'program = jax.jit(run{jit_kwargs})',
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
