"""`meshstate.sharding.describe` tables and `StatefulMapping.explain` / `.lower`.

SPEC section "Inspection": every row of `describe` is checked against what JAX itself reports
for the state's value (`addressable_shards`, `sharding.spec`), `str(table)` is checked for
alignment by cutting each line at the header's column starts, and `explain(...).run()` is
checked against calling the mapping itself (and a numpy reference).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate import LongTermState, ParamState, ShortTermState, State
from meshstate.sharding import describe
from meshstate.transform import pmap2, vmap2
from meshstate.util.filter import PathContains

N = jax.device_count()
KEYS = {'path', 'type', 'shape', 'dtype', 'spec', 'mesh_axes', 'shard_shape',
        'bytes_per_device', 'replicated'}
COLUMNS = ('path', 'type', 'shape', 'dtype', 'spec', 'mesh_axes', 'shard_shape',
           'bytes_per_device', 'replicated')


@pytest.fixture(scope='module')
def mesh2x4():
  return Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))


def put(x, mesh, spec):
  return jax.device_put(jnp.asarray(x), NamedSharding(mesh, spec))


def spec_text(spec):
  """`P('a', None)` as text, whether the row holds a PartitionSpec or its text."""
  if isinstance(spec, P):
    return 'P(' + ', '.join(repr(e) for e in spec) + ')'
  return str(spec)


def axes_by_dim(mesh_axes):
  """`{dim: (axis, ...)}` from a row's mesh_axes (values may be one name or a tuple)."""
  return {int(d): (a,) if isinstance(a, str) else tuple(a) for d, a in dict(mesh_axes).items()}


def jax_facts(value):
  """(shard shapes, largest number of bytes one device holds) as JAX reports them."""
  shapes, per_device = set(), {}
  for shard in value.addressable_shards:
    shapes.add(tuple(shard.data.shape))
    per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return shapes, max(per_device.values())


def check_row(row, path, state):
  """The row agrees with what JAX says about `state`'s value."""
  value = state.value
  assert KEYS <= set(row), f'missing keys {KEYS - set(row)}'
  assert row['path'] == path
  assert row['type'] == type(state).__name__
  assert tuple(row['shape']) == tuple(value.shape)
  assert str(row['dtype']) == str(value.dtype)
  shapes, nbytes = jax_facts(value)
  assert shapes == {tuple(row['shard_shape'])}
  assert row['bytes_per_device'] == nbytes
  assert row['replicated'] is bool(value.sharding.is_fully_replicated)


# -- describe: rows -----------------------------------------------------------------------------

def test_replicated_state_row(mesh2x4):
  w = ParamState(put(np.arange(12, dtype=np.float32).reshape(3, 4), mesh2x4, P()))
  [row] = describe({'w': w}).rows
  check_row(row, 'w', w)
  assert spec_text(row['spec']) == 'P()'
  assert not axes_by_dim(row['mesh_axes'])
  assert row['replicated'] is True
  assert tuple(row['shard_shape']) == (3, 4)
  assert row['bytes_per_device'] == 3 * 4 * 4


def test_state_mapped_along_axis0_after_pmap2():
  buf = State(jnp.zeros((N, 3)))

  def step(x):
    buf.value = buf.value + x
    return x

  f = pmap2(step, axis_name='i', state_in_axes={0: buf}, state_out_axes={0: buf})
  x = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3)
  f(x)
  np.testing.assert_array_equal(np.asarray(buf.value), np.asarray(x))
  [row] = describe([buf]).rows
  check_row(row, '0', buf)
  assert spec_text(row['spec']) == "P('i')"
  assert axes_by_dim(row['mesh_axes']) == {0: ('i',)}
  assert tuple(row['shard_shape']) == (1, 3)
  assert row['bytes_per_device'] == 3 * 4
  assert row['replicated'] is False


def test_two_dim_sharded_rank0_and_rank3_states(mesh2x4):
  w = ParamState(put(np.arange(32, dtype=np.float32).reshape(4, 8), mesh2x4, P('data', 'model')))
  scalar = ShortTermState(put(np.float32(3.0), mesh2x4, P()))
  cube = LongTermState(put(np.ones((2, 3, 8), np.int32), mesh2x4, P('data', None, 'model')))
  rows = {r['path']: r for r in describe({'w': w, 'scalar': scalar, 'cube': cube}).rows}
  assert list(rows) == ['w', 'scalar', 'cube']
  for path, state in (('w', w), ('scalar', scalar), ('cube', cube)):
    check_row(rows[path], path, state)

  assert spec_text(rows['w']['spec']) == "P('data', 'model')"
  assert axes_by_dim(rows['w']['mesh_axes']) == {0: ('data',), 1: ('model',)}
  assert tuple(rows['w']['shard_shape']) == (2, 2)
  assert rows['w']['bytes_per_device'] == 2 * 2 * 4

  assert tuple(rows['scalar']['shape']) == ()
  assert tuple(rows['scalar']['shard_shape']) == ()
  assert rows['scalar']['bytes_per_device'] == 4
  assert rows['scalar']['replicated'] is True

  assert tuple(rows['cube']['shape']) == (2, 3, 8)
  assert rows['cube']['dtype'] == 'int32'
  assert axes_by_dim(rows['cube']['mesh_axes']) == {0: ('data',), 2: ('model',)}
  assert tuple(rows['cube']['shard_shape']) == (1, 3, 2)
  assert rows['cube']['bytes_per_device'] == 1 * 3 * 2 * 4


def test_spec_over_two_mesh_axes_in_one_dim(mesh2x4):
  v = State(put(np.arange(16, dtype=np.float32).reshape(8, 2), mesh2x4, P(('data', 'model'))))
  [row] = describe([v]).rows
  check_row(row, '0', v)
  assert axes_by_dim(row['mesh_axes']) == {0: ('data', 'model')}
  assert tuple(row['shard_shape']) == (1, 2)


class Linear(meshstate.nn.Module):
  def __init__(self, n_in, n_out):
    super().__init__()
    self.weight = ParamState(jnp.ones((n_in, n_out)))
    self.bias = ParamState(jnp.zeros((n_out,)))


class Net(meshstate.nn.Module):
  def __init__(self):
    super().__init__()
    self.layer = Linear(3, 2)
    self.blocks = [Linear(2, 2), Linear(2, 1)]
    self.count = ShortTermState(jnp.zeros((), jnp.int32))

  def __call__(self, x):   # touches layer and count only
    self.count.value = self.count.value + 1
    return x @ self.layer.weight.value + self.layer.bias.value


def test_module_rows_use_dotted_paths():
  net = Net()
  rows = describe(net).rows
  by_path = {r['path']: r for r in rows}
  expected = {'.'.join(map(str, p)): s for p, s in net.states().items()}
  assert set(by_path) == {'layer.weight', 'layer.bias', 'blocks.0.weight', 'blocks.0.bias',
                          'blocks.1.weight', 'blocks.1.bias', 'count'}
  assert len(rows) == len(expected)
  for path, state in expected.items():
    row = by_path[path]
    assert row['type'] == type(state).__name__
    assert tuple(row['shape']) == tuple(state.value.shape)
    assert row['bytes_per_device'] == state.value.nbytes   # one device holds all of it
  assert tuple(by_path['blocks.1.weight']['shape']) == (2, 1)


def test_mapping_rows_are_the_states_it_touched():
  net = Net()
  f = pmap2(net, axis_name='i')
  out = f(jnp.ones((N, 3)))
  np.testing.assert_allclose(np.asarray(out), np.full((N, 2), 3.0))
  rows = describe(f).rows
  assert {r['path'] for r in rows} == {'layer.weight', 'layer.bias', 'count'}
  for row in rows:
    state = {'layer.weight': net.layer.weight, 'layer.bias': net.layer.bias,
             'count': net.count}[row['path']]
    check_row(row, row['path'], state)
  # a closure's states have no path in a module, but still get one row each
  a, b, _untouched = State(jnp.ones(2)), State(jnp.zeros(())), State(jnp.ones(5))
  g = pmap2(lambda x: x * a.value + b.value, axis_name='i')
  g(jnp.ones((N, 2)))
  rows = describe(g).rows
  assert len(rows) == 2
  assert sorted(tuple(r['shape']) for r in rows) == [(), (2,)]
  assert len({r['path'] for r in rows}) == 2


def test_dict_and_list_inputs(mesh2x4):
  a = ParamState(put(np.zeros((4, 8), np.float32), mesh2x4, P(None, 'model')))
  b = State(jnp.arange(5))
  by_key = describe({'alpha': a, 'beta': b}).rows
  by_index = describe([a, b]).rows
  assert [r['path'] for r in by_key] == ['alpha', 'beta']
  assert [r['path'] for r in by_index] == ['0', '1']
  for rows in (by_key, by_index):
    check_row(rows[0], rows[0]['path'], a)
    assert tuple(rows[0]['shard_shape']) == (4, 2)
    assert tuple(rows[1]['shape']) == (5,)
    assert rows[1]['bytes_per_device'] == b.value.nbytes


# -- describe: the printed table ----------------------------------------------------------------

def _cut(line, starts):
  bounds = list(starts) + [None]
  return [line[bounds[i]:bounds[i + 1]].strip() for i in range(len(starts))]


def test_str_is_an_aligned_table(mesh2x4):
  states = {
      'w': ParamState(put(np.zeros((4, 8), np.float32), mesh2x4, P('data', 'model'))),
      'a_much_longer_state_name': State(put(np.zeros((), np.float32), mesh2x4, P())),
      'cube': LongTermState(put(np.zeros((2, 3, 8), np.int8), mesh2x4, P('data', None, 'model'))),
  }
  table = describe(states)
  lines = str(table).splitlines()
  header = lines[0]
  for column in COLUMNS:
    assert column in header.split(), f'{column!r} missing from header {header!r}'
  starts = [header.index(c) for c in COLUMNS]
  assert starts == sorted(starts)
  body = [ln for ln in lines[1:] if set(ln.strip()) - {'-', ' '}]
  assert body[-1].startswith('total:')   # the totals line (see test_totals_...) ends the table
  body = body[:-1]
  assert len(body) == len(states)
  for path, line in zip(states, body):
    for s in starts[1:]:   # every column starts at the header's column start
      assert line[s - 1] == ' ' and line[s] != ' ', (line, s)
    cells = _cut(line, starts)
    assert cells[0] == path
    assert cells[1] == type(states[path]).__name__
    assert cells[3] == str(states[path].value.dtype)
    assert cells[4] == spec_text(states[path].value.sharding.spec)
    assert cells[7] == str(jax_facts(states[path].value)[1])


def test_check_values_flags_stacked_identical_slices():
  mesh = Mesh(np.array(jax.devices()), ('i',))
  legacy = State(jax.pmap(lambda x: x)(jnp.ones((N, 3))))    # old pmap: one copy per device
  broadcast = State(put(np.broadcast_to(np.arange(3.0, dtype=np.float32), (N, 3)), mesh, P('i')))
  distinct = State(put(np.arange(N * 3, dtype=np.float32).reshape(N, 3), mesh, P('i')))
  replicated = State(put(np.ones((N, 3), np.float32), mesh, P()))
  states = {'legacy': legacy, 'broadcast': broadcast, 'distinct': distinct,
            'replicated': replicated}
  plain = describe(states)
  assert all('note' not in r for r in plain.rows)
  checked = describe(states, check_values=True)
  notes = {r['path']: r.get('note') for r in checked.rows}
  assert notes['legacy'] and notes['broadcast']
  assert not notes['distinct']
  assert not notes['replicated']
  # the flag shows up in the printed table, on the flagged states' lines
  text = str(checked).splitlines()
  assert 'note' in text[0].split()
  note_at = text[0].index('note')
  lines = {ln.split()[0]: ln for ln in text[1:] if ln.split()[0] in notes}
  assert set(lines) == set(notes)
  for path, line in lines.items():
    if notes[path]:
      assert line[note_at:].strip() == notes[path]
    else:
      assert not line[note_at:].strip()
  # other rows are unchanged by check_values
  for a, b in zip(plain.rows, checked.rows):
    assert {k: v for k, v in b.items() if k != 'note'} == a


def test_describe_rejects_other_objects():
  with pytest.raises(TypeError):
    describe(3)


# -- explain / lower ----------------------------------------------------------------------------

class Trainer(meshstate.nn.Module):
  """One SGD step of a linear map, a per-device buffer and a step counter."""

  def __init__(self):
    super().__init__()
    self.weight = ParamState(jnp.arange(6.0, dtype=jnp.float32).reshape(3, 2) / 10)
    self.buf = ShortTermState(jnp.zeros((N, 2)))
    self.count = LongTermState(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    y = x @ self.weight.value
    grad = jax.lax.pmean(jnp.outer(x, y), 'devs')
    self.weight.value = self.weight.value - 0.1 * grad
    self.buf.value = self.buf.value + y
    self.count.value = self.count.value + 1
    return y


def mapped(model):
  return pmap2(model, axis_name='devs', state_in_axes={0: PathContains('buf')},
               state_out_axes={0: PathContains('buf')})


def _section(lines, start, stop):
  i = next(k for k, ln in enumerate(lines) if ln.lstrip().startswith(start))
  j = next(k for k, ln in enumerate(lines) if ln.lstrip().startswith(stop))
  return lines[i + 1:j]


def _line_with(lines, name):
  [hit] = [ln for ln in lines if name in ln.split()]
  return hit


X = (jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) - 5) / 7


def test_explain_text_names_mesh_specs_and_program():
  model = Trainer()
  before = [np.asarray(s.value) for s in model.states().values()]
  text = str(mapped(model).explain(X))
  for state, b in zip(model.states().values(), before):   # explain does not run the step
    np.testing.assert_array_equal(np.asarray(state.value), b)
  assert 'devs' in text
  assert 'jax.shard_map(' in text
  lines = text.splitlines()
  ins = _section(lines, 'in_specs', 'out_specs')
  outs = _section(lines, 'out_specs', 'equivalent')
  arg = [ln for ln in ins if 'args' in ln]
  assert len(arg) == 1 and "P('devs')" in arg[0]
  assert "P('devs')" in _line_with(ins, 'buf')
  assert "'devs'" not in _line_with(ins, 'weight') and 'P()' in _line_with(ins, 'weight')
  assert "'devs'" not in _line_with(ins, 'count') and 'P()' in _line_with(ins, 'count')
  assert ins.index(arg[0]) < min(ins.index(_line_with(ins, n)) for n in ('weight', 'buf', 'count'))
  assert "P('devs')" in outs[0] and 'out' in outs[0]
  assert "P('devs')" in _line_with(outs, 'buf')
  assert 'P()' in _line_with(outs, 'weight') and 'P()' in _line_with(outs, 'count')
  # the hand-written program hands shard_map the same specs the text lists
  program = text[text.index('jax.shard_map('):]
  assert "P('devs')" in program and 'in_specs' in program and 'out_specs' in program


def test_explanation_run_matches_the_call():
  by_explain, by_call = Trainer(), Trainer()
  w0 = np.asarray(by_call.weight.value)
  out_explain = mapped(by_explain).explain(X).run()
  out_call = mapped(by_call)(X)
  np.testing.assert_allclose(np.asarray(out_explain), np.asarray(out_call), rtol=1e-6)
  for (path, a), b in zip(by_explain.states().items(), by_call.states().values()):
    assert np.shape(a.value) == np.shape(b.value), path
    np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), rtol=1e-6,
                               err_msg=str(path))
  # and both agree with numpy
  x = np.asarray(X)
  y = x @ w0
  np.testing.assert_allclose(np.asarray(out_call), y, rtol=1e-5, atol=1e-6)
  grad = np.mean([np.outer(xi, yi) for xi, yi in zip(x, y)], axis=0)
  np.testing.assert_allclose(np.asarray(by_call.weight.value), w0 - 0.1 * grad, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(by_call.buf.value), y, rtol=1e-5, atol=1e-6)
  assert int(by_explain.count.value) == int(by_call.count.value) == 1


def test_lower_text_has_mesh_axis_and_sharding():
  text = mapped(Trainer()).lower(X).as_text()
  assert '"devs"' in text or "'devs'" in text
  assert 'sharding' in text


def test_explain_of_vmap2_is_a_type_error():
  w = ParamState(jnp.ones(3))
  f = vmap2(lambda x: x * w.value, axis_name='i')
  with pytest.raises(TypeError):
    f.explain(jnp.ones((4, 3)))


# -- states whose value is not a plain array ----------------------------------------------------

def test_describe_state_with_pytree_value():
  # one row per array of the pytree (formerly one row whose cells were pytrees)
  s = State({'a': jnp.ones(3), 'b': jnp.zeros((2, 2))})
  rows = describe({'tree': s}).rows
  assert [r['path'] for r in rows] == ['tree.a', 'tree.b']
  assert all(r['type'] == 'State' for r in rows)
  assert [tuple(r['shape']) for r in rows] == [(3,), (2, 2)]
  assert 'tree.b' in str(describe({'tree': s}))


def test_describe_random_state_with_typed_key():
  from meshstate.random import RandomState
  rs = RandomState(jax.random.key(0))
  [row] = describe([rs]).rows
  assert row['type'] == 'RandomState'
  assert tuple(row['shape']) == ()
  assert row['bytes_per_device'] == jax.random.key_data(rs.value).nbytes


# -- pytree-valued states, totals, HTML ---------------------------------------------------------

def check_leaf_row(row, path, type_name, value):
  """A row of one array of a (pytree-valued) state agrees with what JAX says about it."""
  assert row['path'] == path and row['type'] == type_name
  assert tuple(row['shape']) == tuple(value.shape) and row['dtype'] == str(value.dtype)
  shapes, nbytes = jax_facts(value)
  assert shapes == {tuple(row['shard_shape'])}
  assert row['bytes_per_device'] == nbytes
  assert row['replicated'] is bool(value.sharding.is_fully_replicated)
  spec = getattr(value.sharding, 'spec', None)
  if spec is not None:
    assert row['spec'] == spec_text(spec)


def test_optax_state_gets_one_row_per_array(mesh2x4):
  optax = pytest.importorskip('optax')
  params = {'w': put(np.ones((4, 8), np.float32), mesh2x4, P('data', 'model')),
            'b': put(np.ones(8, np.float32), mesh2x4, P('model'))}
  opt = ShortTermState(optax.adam(1e-3).init(params))
  w = ParamState(params['w'])
  rows = describe({'w': w, 'opt': opt}).rows
  adam = opt.value[0]
  expected = [('w', params['w']), ('opt.0.count', adam.count), ('opt.0.mu.b', adam.mu['b']),
              ('opt.0.mu.w', adam.mu['w']), ('opt.0.nu.b', adam.nu['b']),
              ('opt.0.nu.w', adam.nu['w'])]
  assert [r['path'] for r in rows] == [p for p, _ in expected]   # EmptyState() has no arrays
  for row, (path, value) in zip(rows, expected):
    check_leaf_row(row, path, 'ParamState' if path == 'w' else 'ShortTermState', value)
  # no cell holds a pytree any more: every line of the printed table is short
  assert max(map(len, str(describe({'opt': opt})).splitlines()[:-1])) < 150


def test_totals_count_states_and_the_bytes_one_device_holds(mesh2x4):
  d0, d1 = jax.devices()[:2]
  states = {
      'w': ParamState(put(np.ones((4, 8), np.float32), mesh2x4, P('data', 'model'))),
      'r': State(put(np.ones(8, np.float32), mesh2x4, P())),
      'on0': State(jax.device_put(jnp.ones(5), d0)),
      'on1': State(jax.device_put(jnp.ones(6), d1)),
      'opt': State({'m': put(np.zeros((4, 8), np.float32), mesh2x4, P(None, 'model')),
                    'c': jax.device_put(jnp.zeros((), jnp.int32), d1)}),
  }
  table = describe(states)
  leaves = jax.tree.leaves([s.value for s in states.values()])
  held = {}
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  assert table.totals == {'states': 5, 'arrays': 6, 'bytes_per_device': max(held.values()),
                          'bytes_global': sum(leaf.nbytes for leaf in leaves)}
  # not the sum of each row's largest per-device share: 'on0' and 'on1' sit on two devices
  assert table.totals['bytes_per_device'] < sum(r['bytes_per_device'] for r in table.rows)
  last = str(table).splitlines()[-1]
  assert last.startswith('total: 5 states, 6 arrays')
  assert f"{table.totals['bytes_per_device']} bytes per device" in last
  assert f"{table.totals['bytes_global']} bytes overall" in last
  # a value still on the host is counted on every device (a transform puts a copy on each)
  host = describe({**states, 'host': State(np.zeros(3, np.float32))}).totals
  assert host['bytes_per_device'] == table.totals['bytes_per_device'] + 12
  assert host['bytes_global'] == table.totals['bytes_global'] + 12
  assert describe([]).totals == {'states': 0, 'arrays': 0, 'bytes_per_device': 0,
                                 'bytes_global': 0}


class _Cells(__import__('html.parser').parser.HTMLParser):
  """The text of each <tr>'s cells, by section (thead/tbody/tfoot)."""

  def __init__(self):
    super().__init__()
    self.rows, self.section, self.cell = [], None, None

  def handle_starttag(self, tag, attrs):
    if tag in ('thead', 'tbody', 'tfoot'):
      self.section = tag
    elif tag == 'tr':
      self.rows.append((self.section, []))
    elif tag in ('td', 'th'):
      self.cell = ''

  def handle_endtag(self, tag):
    if tag in ('td', 'th'):
      self.rows[-1][1].append(self.cell)
      self.cell = None

  def handle_data(self, data):
    if self.cell is not None:
      self.cell += data


def test_repr_html_is_an_escaped_table(mesh2x4):
  states = {'<w&>': ParamState(put(np.ones((4, 8), np.float32), mesh2x4, P(None, 'model'))),
            'n': LongTermState(jnp.zeros((), jnp.int32))}
  table = describe(states)
  markup = table._repr_html_()
  assert '<w&>' not in markup and '&lt;w&amp;&gt;' in markup
  parser = _Cells()
  parser.feed(markup)
  head = [cells for section, cells in parser.rows if section == 'thead']
  body = [cells for section, cells in parser.rows if section == 'tbody']
  foot = [cells for section, cells in parser.rows if section == 'tfoot']
  assert head == [str(table).splitlines()[0].split()]
  assert [c[0] for c in body] == ['<w&>', 'n']
  for cells, row in zip(body, table.rows):
    assert cells[1:5] == [row['type'], str(row['shape']).replace(' ', ''), row['dtype'],
                          row['spec']]
    assert cells[7] == str(row['bytes_per_device'])
  assert foot == [[str(table).splitlines()[-1]]]


# -- visualize ----------------------------------------------------------------------------------

def expand(ids):
  """{0, 1, 2, 3, 6} from '0-3,6'."""
  out = set()
  for part in ids.split(','):
    lo, _, hi = part.partition('-')
    out.update(range(int(lo), int(hi or lo) + 1))
  return out


def parse_picture(text):
  """(header, {(row label, column label): device ids}) read off one picture."""
  lines = text.splitlines()
  first_border = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith('+'))
  col_labels = lines[first_border - 1].split() if first_border > 1 else ['']
  cells = {}
  for ln in lines[first_border:]:
    if '|' in ln:
      row_label = ln[:ln.index('|')].strip()
      texts = [c.strip() for c in ln[ln.index('|') + 1:].rstrip().rstrip('|').split('|')]
      assert len(texts) == len(col_labels), text
      cells.update({(row_label, c): expand(t) for c, t in zip(col_labels, texts)})
  return lines[0], cells


def blocks_by_jax(value):
  """The same map, from JAX's own shards: which devices hold which block."""
  shape = value.shape

  def label(dim):
    if dim is None:
      return ''
    s = shard.index[dim]
    return f'{s.start or 0}:{shape[dim] if s.stop is None else s.stop}'

  out = {}
  for shard in value.addressable_shards:
    key = (label(0) if value.ndim == 2 else '', label(value.ndim - 1) if value.ndim else '')
    out.setdefault(key, set()).add(shard.device.id)
  return out


@pytest.mark.parametrize('shape, spec', [((4, 8), P('data', 'model')), ((4, 8), P(None, 'model')),
                                         ((8, 2), P(('data', 'model'))), ((4, 8), P()),
                                         ((8,), P('model')), ((8,), P()), ((), P())])
def test_visualize_shows_which_device_holds_which_block(mesh2x4, shape, spec):
  value = put(np.zeros(shape, np.float32), mesh2x4, spec)
  header, cells = parse_picture(meshstate.sharding.visualize({'v': State(value)}))
  dims = ','.join(map(str, shape))
  assert header.startswith(f'v: float32[{dims}]  {spec_text(spec)}')
  assert 'data=2, model=4' in header
  assert cells == blocks_by_jax(value)


def test_visualize_single_device_pytree_module_and_array(mesh2x4):
  single = jax.device_put(jnp.ones((2, 3)), jax.devices()[3])
  text = meshstate.sharding.visualize([State(single)])
  header, cells = parse_picture(text)
  assert header == '0: float32[2,3]  single device'
  assert cells == {('0:2', '0:3'): {3}}
  # one picture per array of a pytree-valued state, titled by its path
  opt = State({'m': put(np.zeros((4, 8), np.float32), mesh2x4, P('data')),
               'cube': put(np.zeros((2, 2, 8), np.float32), mesh2x4, P(None, 'data', 'model')),
               'host': np.zeros(2), 'flag': True})
  pictures = meshstate.sharding.visualize({'opt': opt}).split('\n\n')
  assert [p.split(':')[0] for p in pictures] == ['opt.cube', 'opt.flag', 'opt.host', 'opt.m']
  assert '3-D value' in pictures[0] and 'host array' in pictures[2]
  assert 'Python value' in pictures[1]
  assert parse_picture(pictures[3])[1] == blocks_by_jax(opt.value['m'])
  # a Module: every state, by its dotted path; a bare array: its picture without a title
  net = Net()
  titles = [p.split(':')[0] for p in meshstate.sharding.visualize(net).split('\n\n')]
  assert titles == ['.'.join(map(str, p)) for p in net.states()]
  bare = meshstate.sharding.visualize(opt.value['m'])
  assert bare.startswith("float32[4,8]  P('data')")
  assert parse_picture(bare)[1] == blocks_by_jax(opt.value['m'])
  # a bare State is titled by its type; a state holding no array says so
  assert meshstate.sharding.visualize(ParamState(single)).startswith('ParamState: float32[2,3]')
  assert meshstate.sharding.visualize({'e': State(None)}) == 'e: None (no arrays)'
