"""Several processes on one machine: meshstate on JAX's multi-controller runtime.

One launch of 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives) runs every check of
tests/multihost_checks.py (process start and `import jax` dominate a launch): first the
`check_*` ones (global arrays made explicitly, `devices=`/`mesh=` over all devices), then the
`engine_*` ones (pmap2's default mesh over all processes, each passing its own part).
References are computed here, in this (8-device)
process: numpy, or `jax.pmap`'s numbers from inside the children.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import multiprocess
from meshstate.random import RandomState
from meshstate.transform import pmap2
from multihost_checks import reference_training



@pytest.fixture(scope='module')
def today(tmp_path_factory):
  # One launch runs both groups: what works today first, then the engine_* checks.
  return multiprocess.shared(tmp_path_factory, 'checks', lambda: multiprocess.run_checks(
      'multihost_checks', ('check_', 'engine_')))


@pytest.fixture(scope='module')
def engine(today):
  return today


def values(procs, name):
  """Each process's value of check `name`; fails with the error or the children's stderr."""
  out = []
  for p in procs:
    record = p.results.get(name)
    if record is None:
      pytest.fail(f'process {p.process_id} never reported {name}; '
                  f'{multiprocess.failure(procs) or "all exited 0"}\n'
                  f'{p.results.get("_barrier", "")}')
    if 'error' in record:
      pytest.fail(f'{name} failed in process {p.process_id}: {record["error"]}\n'
                  f'{record.get("traceback", "")}')
    out.append(record['value'])
  return out


def layout(procs):
  """(processes, local devices per process) as the children saw them."""
  start = values(procs, '_startup')
  assert len({(s['process_count'], s['local_devices']) for s in start}) == 1
  return start[0]['process_count'], start[0]['local_devices']


def close(a, b):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5,
                             atol=1e-6)


# -- the harness itself ----------------------------------------------------------------------------

def test_children_form_one_runtime_of_all_devices(today):
  assert multiprocess.failure(today) is None
  start = values(today, '_startup')
  assert [s['process_index'] for s in start] == list(range(len(today)))
  for s in start:
    assert s['process_count'] == len(today) == 2
    assert s['local_devices'] == 4
    assert s['devices'] == s['process_count'] * s['local_devices']


def test_harness_reports_a_failing_child_and_kills_the_rest(tmp_path):
  script = tmp_path / 'fail.py'
  script.write_text('import os, sys, time\n'
                    'if os.environ["PROCESS_ID"] == "1":\n'
                    '  sys.exit("child 1 gives up")\n'
                    'time.sleep(60)\n')
  procs = multiprocess.launch([str(script)], timeout=600)
  report = multiprocess.failure(procs)
  # Process 0 was killed (returncode None) as soon as 1 failed; waited for, it would exit 0.
  assert procs[1].returncode == 1 and procs[0].returncode is None
  assert 'child 1 gives up' in report and 'killed' in report


def test_the_coordinator_outlives_a_process_slow_to_exit(tmp_path):
  # Process 0 hosts the coordination service; were it to exit right after the last barrier,
  # process 1 (slow to exit, as on a loaded machine) would abort with "Socket closed".
  module = tmp_path / 'one_check.py'
  module.write_text('def check_index():\n  import jax\n  return jax.process_index()\n')
  procs = multiprocess.run_checks(str(module), env={'MESHSTATE_EXIT_DELAY_S': '2'})
  assert multiprocess.failure(procs) is None, multiprocess.failure(procs)
  assert [p.results['check_index']['value'] for p in procs] == [0, 1]
  assert procs[0].seconds >= procs[1].seconds   # process 0 exits last


# -- works today: explicit global arrays, devices=/mesh= over all devices ------------------------

def test_psum_and_axis_index_span_all_processes(today):
  n_proc, local = layout(today)
  lanes = n_proc * local
  everything = np.arange(1, lanes + 1, dtype=np.float32)
  for p, v in enumerate(values(today, 'check_psum_axis_index_over_global_devices')):
    assert v['global_shape'] == [lanes] and v['out_is_global']
    close(v['psum_local'], [everything.sum()] * local)
    assert v['index_local'] == list(range(p * local, (p + 1) * local))
    close(v['double'], 2 * everything)


def test_helpers_round_trip_between_local_and_global(today):
  n_proc, local = layout(today)
  rows = [np.arange(local * 3, dtype=np.float32).reshape(local, 3) + 100 * p
          for p in range(n_proc)]
  for p, v in enumerate(values(today, 'check_helper_round_trips')):
    m = v['mapped']
    assert m['shape'] == [n_proc * local, 3] and m['is_global'] and m['again_is_same']
    assert m['local_equal'] and m['local_shape'] == [local, 3]
    close(m['gathered'], np.concatenate(rows))
    r = v['replicated']
    assert r['shape'] == [3] and r['is_global'] and r['replicated']
    close(r['local'], [1, 2, 3])
    close(r['gathered'], [1, 2, 3])
    grid = np.stack([np.arange(2 * local, dtype=np.float32) + 10 * q for q in range(n_proc)])
    assert v['grid']['shape'] == list(grid.shape)
    close(v['grid']['local'], grid[p:p + 1])
    close(v['grid']['gathered'], grid)
    assert v['global_shape_path']['shape'] == m['shape']
    close(v['global_shape_path']['gathered'], np.concatenate(rows))
    close(v['tree']['a'], np.concatenate(rows))
    close(v['tree']['b'], [1, 2, 3])
    assert v['tree']['b_replicated']
    close(v['state']['local'], rows[p])
    close(v['state']['gathered'], np.concatenate(rows))
    assert v['plain_is_global'] == [False, False, False]
    assert v['key'] == v['key_expected']


def test_disagreeing_processes_get_a_clear_error_and_stay_in_step(today):
  n_proc, local = layout(today)
  for p, v in enumerate(values(today, 'check_signature_mismatch_fails_cleanly')):
    assert v['different'].startswith('ProcessMismatchError: The processes disagree on the '
                                     'call signature')
    for q in range(n_proc):
      mine = ' (this one)' if q == p else ''
      assert f'process {q}{mine}: x: float32[{4 + q}]' in v['different']
    assert v['same'] is None
    assert v['base_class'] == 'ValueError'
    close(v['after'], [sum(range(1, n_proc * local + 1))] * local)


def test_data_parallel_training_equals_single_process_reference(today):
  n_proc, local = layout(today)
  want_w, want_losses = reference_training(range(n_proc * local))
  for v in values(today, 'check_training_step_over_global_devices'):
    close(v['w'], want_w)
    close(v['losses'], want_losses)
    assert v['w_is_global'] and v['w_replicated']


def test_random_lanes_are_distinct_and_match_one_process(today):
  n_proc, local = layout(today)
  lanes = n_proc * local
  per_process = values(today, 'check_random_draws_over_global_devices')
  for v in per_process:
    first = np.asarray(v['first'])
    assert first.shape == (lanes, 2)
    assert len(np.unique(first)) == first.size
    assert not np.allclose(first, v['second'])   # the key advanced between the calls
    assert v == per_process[0]                    # every process sees the same global draws
  # One process over as many devices draws the very same numbers (keys fold the global lane).
  assert jax.device_count() >= lanes
  rs = RandomState(0)
  f = pmap2(lambda x: x + jax.random.normal(rs.split_key(), (2,)), axis_name='i',
            devices=jax.devices()[:lanes])
  zeros = np.zeros((lanes, 2), np.float32)
  close(per_process[0]['first'], f(zeros))
  close(per_process[0]['second'], f(zeros))
  assert per_process[0]['key'] == np.asarray(rs.value).tolist()


def test_state_aware_shard_map_over_a_global_2d_mesh(today):
  n_proc, local = layout(today)
  x = np.stack([np.arange(2 * local, dtype=np.float32) + 10 * p for p in range(n_proc)])
  w = np.arange(2 * local, dtype=np.float32) + x.sum(axis=0)
  for p, v in enumerate(values(today, 'check_state_aware_shard_map_on_2d_mesh')):
    close(v['w'], w)
    close(v['out'], x * w)
    close(v['out_local'], (x * w)[p:p + 1])
    assert v['w_spec'] == "P('model',)" and v['w_is_global']


def test_pmap2_with_a_global_2d_mesh(today):
  n_proc, local = layout(today)
  x = np.stack([np.arange(2 * local, dtype=np.float32) + 10 * p for p in range(n_proc)])
  for v in values(today, 'check_pmap2_mesh_on_2d_mesh'):
    close(v['w'], 2 + x.sum(axis=0))
    close(v['out'], x + np.arange(n_proc)[:, None])
    assert v['w_spec'] == "P('model',)"


def test_loop_around_pmap2_on_an_explicit_global_2d_mesh(today):
  n_proc, local = layout(today)
  xs = np.stack([np.stack([np.arange(2 * local, dtype=np.float32) + 10 * p + k
                           for p in range(n_proc)]) for k in range(3)])
  w = np.ones(2 * local, np.float32)
  for x in xs:
    w = w * 2 + x.sum(axis=0)
  for v in values(today, 'check_loop_around_pmap2_on_an_explicit_2d_mesh'):
    close(v['out'], xs + 1)
    close(v['w'], w)
    assert v['w_spec'] == "P('model',)" and v['w_type'] == f'float32[{2 * local}@model]'


def test_describe_in_every_process_shows_global_shapes(today):
  n_proc, local = layout(today)
  for v in values(today, 'check_describe_shows_global_layout'):
    mapped, replicated = v['rows']
    assert mapped == {'shape': [n_proc * local, 3], 'spec': "P('i')", 'shard_shape': [1, 3],
                      'bytes_per_device': 12, 'replicated': False}
    assert replicated == {'shape': [3], 'spec': 'P()', 'shard_shape': [3],
                          'bytes_per_device': 12, 'replicated': True}
    assert f'({n_proc * local},3)' in v['text']
    assert v['totals'] == {'states': 2, 'arrays': 2, 'bytes_per_device': 24,
                           'bytes_global': (n_proc * local + 1) * 3 * 4}
    assert v['text'].splitlines()[-1].startswith('total: 2 states')
    # the picture shows every global device, one row block each, and which process holds it
    picture = v['picture'].splitlines()
    assert picture[0] == f"w: float32[{n_proc * local},3]  P('i')  mesh i={n_proc * local}"
    cells = [ln.split('|')[1].strip() for ln in picture if '|' in ln]
    every_id = sorted(i for ids in v['device_ids'].values() for i in ids)
    assert sorted(int(c) for c in cells) == every_id
    assert picture[-1].startswith('processes: ')
    for p, ids in v['device_ids'].items():
      assert f'p{p} holds ' in picture[-1] and len(ids) == local


def test_multihost_docstring_examples_pass_in_every_process(today):
  for v in values(today, 'check_multihost_docstring_examples'):
    assert v['failed'] == 0 and v['attempted'] > 10


# -- the engine's part of issue 7 (flip these when it lands) -------------------------------------

def test_default_pmap2_spans_all_processes(engine):
  n_proc, local = layout(engine)
  for p, v in enumerate(values(engine, 'engine_default_pmap2_maps_over_all_processes')):
    close(v['psum'], [sum(range(1, n_proc * local + 1))] * local)
    assert v['index'] == list(range(p * local, (p + 1) * local))
    assert v['out_shape'] == [local] and not v['out_is_global']


def test_global_inputs_give_global_outputs(engine):
  n_proc, local = layout(engine)
  for v in values(engine, 'engine_global_inputs_give_global_outputs'):
    assert v['out_is_global'] and v['shape'] == [n_proc * local]
    close(v['out'], 2 * np.arange(1, n_proc * local + 1))


def test_same_numbers_as_jax_pmap_on_multi_host(engine):
  for v in values(engine, 'engine_same_numbers_as_jax_pmap'):
    for got, want in zip(v['got'], v['want']):
      close(got, want)


def test_training_loop_on_the_default_mesh_equals_reference(engine):
  n_proc, local = layout(engine)
  want_w, want_losses = reference_training(range(n_proc * local))
  for v in values(engine, 'engine_training_loop_default_mesh'):
    close(v['w'], want_w)
    close(v['losses'], want_losses)
    assert v['w_is_global'] and v['w_replicated']


def test_mapped_state_created_locally_becomes_global(engine):
  n_proc, local = layout(engine)
  lanes = n_proc * local
  all_rows = np.tile(np.arange(1, lanes + 1, dtype=np.float32)[:, None], (1, 3)) + 1
  for p, v in enumerate(values(engine, 'engine_mapped_state_becomes_global')):
    assert v['is_global'] and v['shape'] == [lanes, 3]
    close(v['local'], all_rows[p * local:(p + 1) * local])
    close(v['gathered'], all_rows)
    close(v['total'], [all_rows.sum()] * local)


def test_random_lanes_distinct_across_processes_without_seed(engine):
  per_process = values(engine, 'engine_random_lanes_distinct_without_seed')
  draws = np.concatenate([v['draws_local'] for v in per_process])
  assert len(np.unique(draws)) == draws.size
  assert all(v['key'] == per_process[0]['key'] for v in per_process)


def test_describe_and_explain_in_every_process(engine):
  n_proc, local = layout(engine)
  for v in values(engine, 'engine_describe_and_explain_stay_local'):
    assert v['shape'] == [n_proc * local, 3] and v['shard_shape'] == [1, 3]
    assert v['process_columns'], 'no column says which process owns which shard'
    assert all(str(q) in ' '.join(v['process_cells']) for q in range(n_proc))
    assert f"'i': {n_proc * local}" in v['explain']


def test_more_lanes_than_devices_with_devices_and_mesh(engine):
  n_proc, local = layout(engine)
  lanes = 2 * n_proc * local
  for v in values(engine, 'engine_more_lanes_than_devices_with_devices_and_mesh'):
    for how in ('devices', 'mesh'):
      assert isinstance(v[how], dict), v[how]
      close(v[how]['psum'], [lanes * (lanes + 1) / 2] * lanes)
      assert v[how]['index'] == list(range(lanes))


def test_default_more_lanes_than_devices_across_processes(engine):
  n_proc, local = layout(engine)
  lanes = 2 * n_proc * local
  for p, v in enumerate(values(engine, 'engine_default_more_lanes_than_devices')):
    close(v['psum'], [lanes * (lanes + 1) / 2] * (2 * local))
    assert v['index'] == list(range(p * 2 * local, (p + 1) * 2 * local))


def test_signature_mismatch_raises_in_every_process(engine):
  for v in values(engine, 'engine_z_signature_mismatch_raises_in_every_process'):
    for what in ('shapes', 'static'):
      assert v[what] is not None and 'process' in v[what], v[what]
