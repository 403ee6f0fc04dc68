"""The checks that run INSIDE each of the processes launched by tests/test_multihost.py.

`tests/multiprocess.py` runs them all in one launch: first every `check_*` function (what
works today: global arrays made explicitly, `devices=`/`mesh=` over all processes' devices),
then every `engine_*` one (pmap2 on its default mesh over all processes; they come
last, so that a hang there costs no `check_*` result).
A check returns plain data (lists, numbers, strings, booleans); the test in the parent
process compares it with a reference computed there. Every process runs the same checks in
the same order, as every multi-process JAX program must.

The data are functions of the GLOBAL lane index (`lane_data`), so the parent can build the
single-process reference over all lanes.
"""
from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate.random import RandomState
from meshstate.transform import pmap2
from meshstate.transform import _multihost as mh
from meshstate.multihost import (ProcessMismatchError, assert_same_across_processes,
                                             gather, global_devices, is_global, local_value,
                                             to_global, to_local)

FEATURES, ROWS, STEPS, LR = 3, 5, 5, 0.1


def lane_data(lane: int) -> tuple[np.ndarray, np.ndarray]:
  """`(x[ROWS, FEATURES], y[ROWS])` of one global lane: the same in every process."""
  rs = np.random.RandomState(100 + lane)
  return (rs.standard_normal((ROWS, FEATURES)).astype(np.float32),
          rs.standard_normal(ROWS).astype(np.float32))


def lanes_data(lanes) -> tuple[np.ndarray, np.ndarray]:
  xs, ys = zip(*map(lane_data, lanes))
  return np.stack(xs), np.stack(ys)


def my_lanes(per_device: int = 1) -> range:
  """The global lanes of this process: a contiguous block (devices are grouped by process)."""
  n = jax.local_device_count() * per_device
  return range(jax.process_index() * n, (jax.process_index() + 1) * n)


def train_step_fn(w: meshstate.State, axis: str):
  """One data-parallel SGD step on a linear model: grads averaged over the mapped axis."""
  def step(x, y):
    def loss_fn(v):
      return jnp.mean((x @ v - y) ** 2)
    loss, grad = jax.value_and_grad(loss_fn)(w.value)
    w.value = w.value - LR * lax.pmean(grad, axis)
    return lax.pmean(loss, axis)
  return step


def reference_training(lanes) -> tuple[np.ndarray, list[float]]:
  """The weights and losses of `STEPS` steps over all `lanes` in one process, in numpy."""
  x, y = lanes_data(lanes)
  w, losses = np.zeros(FEATURES, np.float64), []
  for _ in range(STEPS):
    err = np.einsum('lrf,f->lr', x, w) - y
    losses.append(float(np.mean(err ** 2)))
    grad = np.mean(2 * np.einsum('lr,lrf->lf', err, x) / ROWS, axis=0)
    w = w - LR * grad
  return w, losses


def _mesh_1d() -> Mesh:
  return Mesh(np.array(global_devices()), ('i',))


def _mesh_2d() -> Mesh:
  """('data', 'model'): 'data' across processes, 'model' over each process's own devices."""
  return Mesh(np.array(global_devices()).reshape(jax.process_count(), -1), ('data', 'model'))


def _local_values(per_device: int = 1) -> np.ndarray:
  """This process's part of the global vector 1, 2, ..., lanes."""
  return np.array(my_lanes(per_device), np.float32) + 1


def _error(fn) -> str | None:
  try:
    fn()
  except Exception as err:
    return f'{type(err).__name__}: {err}'
  return None


# -- what works today: explicit global arrays ------------------------------------------------------

def check_psum_axis_index_over_global_devices():
  f = pmap2(lambda v: (lax.psum(v, 'i'), lax.axis_index('i'), v * 2), axis_name='i',
            devices=global_devices())
  x = to_global(_local_values(), NamedSharding(_mesh_1d(), P('i')))
  total, index, double = f(x)
  return {'global_shape': x.shape, 'out_is_global': is_global(total),
          'psum_local': to_local(total), 'index_local': to_local(index),
          'double': gather(double)}


def check_helper_round_trips():
  n, me = jax.local_device_count(), jax.process_index()
  mesh1, mesh2 = _mesh_1d(), _mesh_2d()
  rows = np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * me
  mapped = to_global(rows, NamedSharding(mesh1, P('i')))
  same = np.array([1., 2., 3.], np.float32)                        # equal in every process
  replicated = to_global(same, NamedSharding(mesh1, P()))
  block = np.arange(mesh2.shape['model'] * 2, dtype=np.float32)[None] + 10 * me
  grid = to_global(block, NamedSharding(mesh2, P('data', 'model')))
  shaped = to_global(rows, NamedSharding(mesh1, P('i')), global_shape=mapped.shape)
  tree = to_global({'a': rows, 'b': same},
                   {'a': NamedSharding(mesh1, P('i')), 'b': NamedSharding(mesh1, P())})
  state = meshstate.ParamState(mapped)
  key_state = meshstate.State(jax.random.key(3))
  return {
      'mapped': {'shape': mapped.shape, 'is_global': is_global(mapped),
                 'local_equal': bool(np.array_equal(np.asarray(to_local(mapped)), rows)),
                 'local_shape': to_local(mapped).shape, 'gathered': gather(mapped),
                 'again_is_same': to_global(mapped, NamedSharding(mesh1, P('i'))) is mapped},
      'replicated': {'shape': replicated.shape, 'is_global': is_global(replicated),
                     'replicated': replicated.sharding.is_fully_replicated,
                     'local': to_local(replicated), 'gathered': gather(replicated)},
      'grid': {'shape': grid.shape, 'local': to_local(grid), 'gathered': gather(grid)},
      'global_shape_path': {'shape': shaped.shape, 'gathered': gather(shaped)},
      'tree': {'a': gather(tree['a']), 'b': gather(tree['b']),
               'b_replicated': tree['b'].sharding.is_fully_replicated},
      'state': {'local': local_value(state), 'gathered': gather({'w': state})['w']},
      'plain_is_global': [is_global(rows), is_global(jnp.ones(2)), is_global(1.0)],
      'key': gather(key_state),
      'key_expected': jax.random.key_data(jax.random.key(3)),
  }


def check_signature_mismatch_fails_cleanly():
  me = jax.process_index()
  different = _error(lambda: assert_same_across_processes(f'x: float32[{4 + me}]'))
  same = _error(lambda: assert_same_across_processes('x: float32[4]'))
  kind = None
  try:
    assert_same_across_processes(f'static n={me}', what='static arguments')
  except ProcessMismatchError as err:
    kind = type(err).__mro__[1].__name__
  # The processes are still in step: a collective afterwards gives the right numbers.
  f = pmap2(lambda v: lax.psum(v, 'i'), axis_name='i', devices=global_devices())
  after = to_local(f(to_global(_local_values(), NamedSharding(_mesh_1d(), P('i')))))
  return {'different': different, 'same': same, 'base_class': kind, 'after': after}


def check_training_step_over_global_devices():
  w = meshstate.ParamState(jnp.zeros(FEATURES))   # created locally: replicated, the same
  step = pmap2(train_step_fn(w, 'batch'), axis_name='batch', devices=global_devices())
  sharding = NamedSharding(_mesh_1d(), P('i'))
  x, y = to_global(lanes_data(my_lanes()), sharding)
  losses = [float(to_local(step(x, y))[0]) for _ in range(STEPS)]
  return {'w': gather(w), 'losses': losses, 'w_is_global': is_global(w.value),
          'w_replicated': w.value.sharding.is_fully_replicated}


def check_random_draws_over_global_devices():
  rs = RandomState(0)                              # the same key in every process
  f = pmap2(lambda v: v + jax.random.normal(rs.split_key(), (2,)), axis_name='i',
            devices=global_devices())
  x = to_global(np.zeros((jax.local_device_count(), 2), np.float32),
                NamedSharding(_mesh_1d(), P('i')))
  first, second = gather(f(x)), gather(f(x))
  return {'first': first, 'second': second, 'key': gather(rs)}


def check_state_aware_shard_map_on_2d_mesh():
  mesh = _mesh_2d()
  model = mesh.shape['model']
  me = jax.process_index()
  w = meshstate.ParamState(to_global(np.arange(2 * model, dtype=np.float32),
                                     NamedSharding(mesh, P('model'))))

  @meshstate.transform.shard_map(mesh=mesh, in_specs=P('data', 'model'),
                                 out_specs=P('data', 'model'), state_in_specs={w: P('model')})
  def step(x):
    w.value = w.value + lax.psum(x.sum(axis=0), 'data')
    return x * w.value

  local = np.arange(2 * model, dtype=np.float32)[None] + 10 * me
  x = to_global(local, NamedSharding(mesh, P('data', 'model')))
  out = step(x)
  return {'out_local': to_local(out), 'out': gather(out), 'w': gather(w),
          'w_spec': str(w.value.sharding.spec), 'w_is_global': is_global(w.value)}


def check_pmap2_mesh_on_2d_mesh():
  mesh = _mesh_2d()
  model = mesh.shape['model']
  me = jax.process_index()
  w = meshstate.ParamState(to_global(np.ones(2 * model, np.float32),
                                     NamedSharding(mesh, P('model'))))

  @pmap2(axis_name='data', mesh=mesh)
  def step(x):
    w.value = w.value * 2 + lax.psum(x, 'data')
    return x + lax.axis_index('data')

  local = np.arange(2 * model, dtype=np.float32)[None] + 10 * me
  out = step(to_global(local, NamedSharding(mesh, P('data', 'model'))))
  return {'out': gather(out), 'w': gather(w), 'w_spec': str(w.value.sharding.spec)}


def check_loop_around_pmap2_on_an_explicit_2d_mesh():
  # jax.make_mesh's default (Explicit axes), with a jit(for_loop) around the step.
  explicit = (jax.sharding.AxisType.Explicit,) * 2
  mesh = Mesh(_mesh_2d().devices, ('data', 'model'), axis_types=explicit)
  model = mesh.shape['model']
  me = jax.process_index()
  w = meshstate.ParamState(to_global(np.ones(2 * model, np.float32),
                                     NamedSharding(mesh, P('model'))))
  step = pmap2(lambda x: setattr(w, 'value', w.value * 2 + lax.psum(x, 'data')) or x + 1,
               axis_name='data', mesh=mesh)
  local = np.stack([np.arange(2 * model, dtype=np.float32)[None] + 10 * me + k
                    for k in range(3)])
  xs = to_global(local, NamedSharding(mesh, P(None, 'data', 'model')))
  out = meshstate.transform.jit(lambda xs: meshstate.transform.for_loop(step, xs))(xs)
  return {'out': gather(out), 'w': gather(w), 'w_spec': str(w.value.sharding.spec),
          'w_type': str(jax.typeof(w.value))}


def check_describe_shows_global_layout():
  mesh = _mesh_1d()
  n = jax.local_device_count()
  w = meshstate.ParamState(to_global(np.ones((n, 3), np.float32), NamedSharding(mesh, P('i'))))
  b = meshstate.ParamState(to_global(np.ones(3, np.float32), NamedSharding(mesh, P())))
  table = meshstate.sharding.describe({'w': w, 'b': b})
  keep = ('shape', 'spec', 'shard_shape', 'bytes_per_device', 'replicated')
  return {'rows': [{k: row[k] for k in keep} for row in table.rows], 'text': str(table),
          'totals': table.totals, 'picture': meshstate.sharding.visualize({'w': w}),
          'device_ids': {str(p): sorted(d.id for d in jax.devices() if d.process_index == p)
                         for p in range(jax.process_count())}}


def check_multihost_docstring_examples():
  result = doctest.testmod(mh, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  return {'failed': result.failed, 'attempted': result.attempted}


# -- the default mesh over all processes ----------------------------------------------------------

def engine_default_pmap2_maps_over_all_processes():
  f = pmap2(lambda v: (lax.psum(v, 'i'), lax.axis_index('i')), axis_name='i')
  total, index = f(_local_values())                  # each process passes its local part
  return {'psum': total, 'index': index, 'out_is_global': is_global(total),
          'out_shape': total.shape}


def engine_global_inputs_give_global_outputs():
  f = pmap2(lambda v: v * 2, axis_name='i')
  x = to_global(_local_values(), NamedSharding(_mesh_1d(), P('i')))
  out = f(x)
  return {'out_is_global': is_global(out), 'shape': out.shape, 'out': gather(out)}


def engine_same_numbers_as_jax_pmap():
  def program(v):
    return lax.psum(v, 'i'), lax.axis_index('i'), lax.pmean(v ** 2, 'i'), v * 3
  x = _local_values()
  want = jax.pmap(program, axis_name='i')(x)
  got = pmap2(program, axis_name='i')(x)
  return {'want': [np.asarray(a) for a in want], 'got': [np.asarray(a) for a in got]}


def engine_training_loop_default_mesh():
  w = meshstate.ParamState(jnp.zeros(FEATURES))
  step = pmap2(train_step_fn(w, 'batch'), axis_name='batch')
  x, y = lanes_data(my_lanes())                  # numpy: this process's lanes only
  losses = [float(step(x, y)[0]) for _ in range(STEPS)]
  return {'w': gather(w), 'losses': losses, 'w_is_global': is_global(w.value),
          'w_replicated': w.value.sharding.is_fully_replicated}


def engine_mapped_state_becomes_global():
  n = jax.local_device_count()
  rows = np.tile(_local_values()[:, None], (1, 3))
  h = meshstate.ShortTermState(jnp.asarray(rows))   # created with its local shape

  @pmap2(axis_name='i', state_in_axes={0: h}, state_out_axes={0: h})
  def step(v):
    h.value = h.value + v
    return lax.psum(h.value.sum(), 'i')

  total = step(jnp.ones(n))
  return {'is_global': is_global(h.value), 'shape': h.value.shape,
          'local': local_value(h), 'gathered': gather(h), 'total': total}


def engine_random_lanes_distinct_without_seed():
  f = pmap2(lambda v: v + meshstate.random.normal(), axis_name='i')   # DEFAULT from entropy
  draws = f(np.zeros(jax.local_device_count(), np.float32))
  return {'draws_local': to_local(draws), 'key': gather(meshstate.random.DEFAULT.value)}


def engine_describe_and_explain_stay_local():
  n = jax.local_device_count()
  h = meshstate.ShortTermState(jnp.ones((n, 3)))
  f = pmap2(lambda v: h.value.sum() + v, axis_name='i', state_in_axes={0: h})
  f(np.zeros(n, np.float32))
  table = meshstate.sharding.describe({'h': h}, check_values=True)
  row = table.rows[0]
  return {'shape': row['shape'], 'shard_shape': row['shard_shape'],
          'process_columns': sorted(k for k in row if 'process' in k),
          'process_cells': [str(row[k]) for k in sorted(row) if 'process' in k],
          'explain': str(f.explain(np.zeros(n, np.float32)))}


def engine_more_lanes_than_devices_with_devices_and_mesh():
  per_device = 2
  mesh = _mesh_1d()
  x = to_global(_local_values(per_device), NamedSharding(mesh, P('i')))
  program = lambda v: (lax.psum(v, 'i'), lax.axis_index('i'))  # noqa: E731
  outs = {}
  for how, kwargs in (('devices', {'devices': global_devices()}), ('mesh', {'mesh': mesh})):
    try:
      total, index = pmap2(program, axis_name='i', **kwargs)(x)
      outs[how] = {'psum': gather(total), 'index': gather(index)}
    except Exception as err:
      outs[how] = f'{type(err).__name__}: {err}'
  return outs


def engine_default_more_lanes_than_devices():
  total, index = pmap2(lambda v: (lax.psum(v, 'i'), lax.axis_index('i')),
                       axis_name='i')(_local_values(2))
  return {'psum': total, 'index': index}


def engine_z_signature_mismatch_raises_in_every_process():
  # Last on purpose: an engine that misses the check leaves the processes out of step.
  me = jax.process_index()
  f = pmap2(lambda v: lax.psum(v, 'i'), axis_name='i')
  shapes = _error(lambda: f(np.ones((jax.local_device_count(), 3 + me), np.float32)))
  g = pmap2(lambda v, k: v * k, axis_name='i', static_broadcasted_argnums=1)
  static = _error(lambda: g(np.ones(jax.local_device_count(), np.float32), 2 + me))
  return {'shapes': shapes, 'static': static}
