"""One Python trace of the body per call signature: the discovery trace is the program.

Each body below runs through its transform twice: as meshstate builds it (one trace, its state
reads lifted to program inputs) and with lifting switched off (the body traced a second time to
build the program). Outputs, states and random draws must agree, and the counts of traces say
which path ran.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshstate
from meshstate import ParamState, ShortTermState, State
from meshstate.random import RandomState
from meshstate.transform import _engine, jit, pmap2, shard_map, vmap2

from helpers import N, close, mesh_2x4, nested_step, nested_want


class _NoLift(_engine.Reader):
  def program(self, *args, **kwargs):
    return None


def _states():
  return dict(w=ParamState(jnp.arange(N * 3.0).reshape(N, 3)),
              tree=ShortTermState({'a': jnp.ones(3), 'b': (jnp.zeros(()), jnp.ones(2))}),
              total=State(jnp.zeros(())), rng=RandomState(7))


def _bodies(s, traces):
  def plain(x):
    traces.append(1)
    s['w'].value = s['w'].value * 2 + x
    s['total'].value = s['total'].value + lax.psum(x.sum(), 'i')
    return x + s['tree'].value['a']

  def trees_and_random(x):
    traces.append(1)
    t = s['tree'].value
    s['tree'].value = {'a': t['a'] + lax.pmean(x, 'i'), 'b': (t['b'][0] + 1, t['b'][1] * 2)}
    return x + s["rng"].normal(size=x.shape)

  def grad_scan_cond(x):
    traces.append(1)
    w = s['w'].value
    loss = lambda w: jnp.sum((w * x - s['tree'].value['a']) ** 2)  # noqa: E731
    g = lax.pmean(jax.grad(loss)(w), 'i')
    carry, ys = lax.scan(lambda c, xi: (c + xi * w, c), jnp.zeros(3), x[None].repeat(2, 0))
    s['w'].value = w - 0.1 * g + lax.cond(carry.sum() > 0, lambda: 1.0, lambda: 0.0)
    s['total'].value = lax.psum(ys.sum(), 'i') + s['rng'].uniform()
    return jax.vmap(lambda a: a * s['total'].value)(x)

  return {'plain': plain, 'trees_and_random': trees_and_random,
          'grad_scan_cond': grad_scan_cond}


def _one_trace_equals_two(run, *args):
  """`run(*args, lift=...)` with lifting on, then off: one trace against two, and the same
  outputs and states; returns the lifted run's (outputs, states)."""
  outs, states, traces = run(*args, lift=True)
  outs2, states2, traces2 = run(*args, lift=False)
  assert (traces, traces2) == (1, 2)
  jax.tree.map(close, outs, outs2)
  jax.tree.map(close, states, states2)
  return outs, states


def _run(which, kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  s, traces = _states(), []
  body = _bodies(s, traces)[which]
  kw = {} if which == 'trees_and_random' else dict(state_in_axes={0: s['w']},
                                                   state_out_axes={0: s['w']})
  f = (pmap2 if kind == 'pmap2' else vmap2)(body, axis_name='i', **kw)
  x = jnp.arange(N * 3.0).reshape(N, 3) / 10
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, jax.tree.map(np.asarray, {k: v.value for k, v in s.items()}), len(traces)


@pytest.mark.parametrize('kind', ['pmap2', 'vmap2'])
@pytest.mark.parametrize('which', ['plain', 'trees_and_random', 'grad_scan_cond'])
def test_one_trace_equals_two_traces(which, kind, monkeypatch):
  outs, states = _one_trace_equals_two(_run, which, kind, monkeypatch)
  advanced = not np.array_equal(states['rng'], RandomState(7).value)
  assert advanced == (which != 'plain')   # a random state read advances once per call


def test_random_draws_differ_per_lane_and_advance_per_call():
  rng, traces = RandomState(3), []

  def draw(x):
    traces.append(1)
    return x + rng.uniform()

  f = pmap2(draw, axis_name='i')
  first, second = f(jnp.zeros(N)), f(jnp.zeros(N))
  assert len(set(np.asarray(first).tolist())) == N
  assert not np.array_equal(first, second) and len(traces) == 1


def test_a_changed_state_shape_and_a_new_argument_shape_trace_once_each():
  w, traces = State(jnp.ones(3)), []

  def step(x):
    traces.append(1)
    w.value = w.value + lax.psum(x, 'i').sum()
    return x

  f = pmap2(step, axis_name='i')
  f(jnp.ones(N))
  f(jnp.ones(N))
  assert len(traces) == 1
  w.value = jnp.ones(5)
  f(jnp.ones(N))
  assert len(traces) == 2 and w.value.shape == (5,)
  close(w.value, jnp.full(5, 1.0 + N))
  f(jnp.ones((N, 2)))
  assert len(traces) == 3
  close(w.value, jnp.full(5, 1.0 + 3 * N))


def test_jit_and_unchecked_shard_map_trace_once():
  count, traces = State(jnp.zeros(())), []
  mesh = Mesh(np.array(jax.devices()), ('i',))

  def step(x):
    traces.append(1)
    count.value = count.value + x.sum()
    return x * 2

  close(jit(step)(jnp.ones(4)), jnp.full(4, 2.0))
  g = shard_map(lambda x: step(lax.psum(x, 'i')), mesh, P('i'), P(), check_vma=False)
  close(g(jnp.ones(N)), jnp.full(1, 2.0 * N))
  assert len(traces) == 2
  close(count.value, 4.0 + N)


def _first_read_inside(kind, s, traces):
  """A pmap2 body whose states are first read inside a nested jit, scan, cond, for_loop or
  meshstate call."""
  def nested(v):
    s['w'].value = s['w'].value * s['total'].value + v
    return v.sum()

  reader = vmap2(lambda v: (s['w'].value * s['total'].value * v).sum(), in_axes=0)
  inner = jit(nested) if kind == 'meshstate.jit' else lambda v: reader(jnp.stack([v, -v])).sum()

  def step(x):
    traces.append(1)
    v = lax.psum(x, 'i')
    if kind == 'jit':
      s['w'].value = jax.jit(lambda v: s['w'].value + v)(v)
    elif kind == 'scan':
      c, _ = lax.scan(lambda c, _: (c + s['w'].value * s['total'].value, None), v, None, 3)
      s['w'].value = c
    elif kind == 'cond':
      s['w'].value = lax.cond(v.sum() > 0, lambda: s['w'].value * 2, lambda: s['w'].value)
    elif kind in ('meshstate.jit', 'vmap2'):
      return x + inner(v)
    else:
      def body(i):
        s['w'].value = s['w'].value + v * i + s['total'].value
      meshstate.transform.for_loop(body, jnp.arange(3))
    return x
  return step


@pytest.mark.parametrize('kind', ['jit', 'scan', 'cond', 'for_loop', 'meshstate.jit', 'vmap2'])
def test_first_reads_inside_nested_bodies_trace_once_and_equal_two_traces(kind, monkeypatch):
  def run(lift):
    if not lift:
      monkeypatch.setattr(_engine, 'Reader', _NoLift)
    s = dict(w=State(jnp.ones(3)), total=State(jnp.full((), 0.5)))
    traces = []
    f = pmap2(_first_read_inside(kind, s, traces), axis_name='i')
    x = jnp.arange(N * 3.0).reshape(N, 3) / 10
    outs = [f(x), f(x + 1)]
    monkeypatch.undo()
    return outs, np.asarray(s['w'].value), len(traces)

  _one_trace_equals_two(run)


def _on_explicit_1d(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = jax.make_mesh((N,), ('i',), axis_types=(jax.sharding.AxisType.Explicit,))
  w = ParamState(jax.device_put(jnp.arange(N * 2.0).reshape(N, 2), NamedSharding(mesh, P('i'))))
  rng, traces = RandomState(3), []

  def step(x):
    traces.append(1)
    w.value = w.value * 2 + lax.pmean(x, 'i')
    return x + rng.uniform()

  f = pmap2(step, axis_name='i', mesh=mesh, state_in_axes={0: w}, state_out_axes={0: w})
  x = jax.device_put(jnp.arange(N * 2.0).reshape(N, 2) / 10, NamedSharding(mesh, P('i')))
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, w.value, len(traces)


def test_explicit_mesh_whose_axes_are_all_manual_traces_once(monkeypatch):
  # Inside the shard_map every Explicit axis is manual, so the body's values are untyped, as
  # in discovery: the discovery trace is the program.
  outs, w = _one_trace_equals_two(_on_explicit_1d, monkeypatch)
  assert tuple(w.sharding.spec) in {('i',), ('i', None)}   # still laid out along 'i' and
  assert jax.typeof(w).sharding.spec[0] == 'i'   # typed so, on the Explicit mesh
  assert len(set(np.asarray(outs[0])[:, 0].tolist())) == N   # each lane draws its own number


def _vmap2_on_explicit_input(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = jax.make_mesh((N,), ('i',), axis_types=(jax.sharding.AxisType.Explicit,))
  on = lambda v, *spec: jax.device_put(v, NamedSharding(mesh, P(*spec)))  # noqa: E731
  w = ParamState(on(jnp.arange(N * 3.0).reshape(N, 3), 'i'))
  tree, count = State(on({'a': jnp.ones(3), 'b': jnp.zeros(2)})), State(on(jnp.zeros(())))
  rng, traces = RandomState(3), []
  rng.value = on(rng.value)   # as a call leaves it: its type stays the same from call to call

  def step(x):
    traces.append(1)
    g = jax.grad(lambda w: jnp.sum(w * x * tree.value['a']))(w.value)
    c, _ = lax.scan(lambda c, xi: (c + xi * w.value, c), jnp.zeros(3), x[None].repeat(2, 0))
    w.value = w.value - 0.1 * g + c + lax.cond(c.sum() > 0, lambda: 1.0, lambda: 0.0)
    tree.value = {'a': tree.value['a'] * 2, 'b': tree.value['b'] + 1}
    count.value = count.value + 1
    return x + rng.uniform(size=x.shape) + lax.axis_index('k') + jax.jit(jnp.sin)(count.value)

  f = vmap2(step, axis_name='k', state_in_axes={0: w}, state_out_axes={0: w})
  x = on(jnp.arange(N * 3.0).reshape(N, 3) / 10, 'i')
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, (w.value, tree.value, count.value), len(traces)


def test_vmap2_on_an_input_sharded_on_an_explicit_mesh_traces_once(monkeypatch):
  # Lanes keep the input's mesh in their type (the lane of a P('i') value is replicated on
  # it), and the program is traced under that mesh, as discovery was.
  outs, (w, tree, count) = _one_trace_equals_two(_vmap2_on_explicit_input, monkeypatch)
  assert str(jax.typeof(w)) == f'float32[{N}@i,3]' and float(count) == 2.0
  assert outs[0].sharding.spec == P('i', None)
  x = np.arange(N * 3.0).reshape(N, 3) / 10
  draws = np.asarray(outs[0]) - x - np.arange(N)[:, None] - np.sin(1.0)
  assert ((draws > -1e-5) & (draws < 1 + 1e-5)).all()
  assert len(np.unique(draws.round(5))) == 3 * N   # each lane draws its own numbers



def _vmap2_on_a_named_explicit_state(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = jax.make_mesh((N,), ('i',))
  w = ParamState(jax.device_put(jnp.arange(N * 3.0).reshape(N, 3), NamedSharding(mesh, P('i'))))
  rng, traces = RandomState(4), []
  rng.value = jax.device_put(rng.value, NamedSharding(mesh, P()))   # as a call leaves it

  def step(v):
    traces.append(1)
    w.value = w.value * 0.5 + v
    return v.sum() + rng.uniform() + lax.axis_index('i')

  f = vmap2(step, axis_name='i', state_in_axes={0: w}, state_out_axes={0: w})
  x = jnp.arange(N * 3.0).reshape(N, 3) / 10   # on no mesh: only w is typed by one
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, (w.value, rng.value), len(traces)


def test_vmap2_of_a_named_state_on_an_explicit_mesh_and_a_plain_batch_traces_once(monkeypatch):
  # The program runs under w's mesh, which state_in_axes names before the body is traced:
  # discovery is traced under it too.
  outs, (w, _) = _one_trace_equals_two(_vmap2_on_a_named_explicit_state, monkeypatch)
  assert str(jax.typeof(w)) == f'float32[{N}@i,3]'
  draws = np.asarray(outs[0]) - np.arange(N * 3.0).reshape(N, 3).sum(1) / 10 - np.arange(N)
  assert ((draws > -1e-5) & (draws < 1 + 1e-5)).all() and len(np.unique(draws.round(5))) == N


def _vmap2_on_explicit_states_by_filter(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = jax.make_mesh((N,), ('i',))
  w = ParamState(jax.device_put(jnp.arange(N * 3.0).reshape(N, 3), NamedSharding(mesh, P('i'))))
  scale = ShortTermState(jax.device_put(jnp.full(3, 2.0), NamedSharding(mesh, P())))
  rng, traces = RandomState(4), []

  def step(v):
    traces.append('start')
    w.value = w.value * 0.5 + v * scale.value   # a per-lane state, then an unmapped one
    traces.append('end')
    return v.sum() + rng.uniform() + lax.axis_index('i')

  f = vmap2(step, axis_name='i', state_in_axes={0: ParamState}, state_out_axes={0: ParamState})
  x = jnp.arange(N * 3.0).reshape(N, 3) / 10   # on no mesh; no state is named before the call
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, (w.value, rng.value), traces


def test_vmap2_of_states_on_an_explicit_mesh_found_by_a_filter_runs_its_body_once(monkeypatch):
  # Traced under no mesh, discovery stops at the first read of a state typed by one and runs
  # again under that mesh, the program's: the body runs to its end once, and that is the
  # program. (With lifting off it runs to its end twice.)
  outs, (w, _), traces = _vmap2_on_explicit_states_by_filter(monkeypatch, lift=True)
  outs2, states2, traces2 = _vmap2_on_explicit_states_by_filter(monkeypatch, lift=False)
  assert traces == ['start', 'start', 'end'] and traces2.count('end') == 2
  jax.tree.map(close, outs, outs2)
  jax.tree.map(close, (w, _), states2)
  assert str(jax.typeof(w)) == f'float32[{N}@i,3]'
  x = np.arange(N * 3.0).reshape(N, 3) / 10
  close(w, (np.arange(N * 3.0).reshape(N, 3) * 0.5 + x * 2) * 0.5 + (x + 1) * 2)
  draws = np.asarray(outs[0]) - x.sum(1) - np.arange(N)
  assert ((draws > -1e-5) & (draws < 1 + 1e-5)).all() and len(np.unique(draws.round(5))) == N


def test_vmap2_that_found_its_mesh_mid_trace_traces_a_new_signature_once():
  # The first call's discovery stops at the read of a state typed by a mesh that nothing named
  # and starts again under it; a later signature (another shape of y) starts under that mesh.
  mesh = jax.make_mesh((N,), ('i',))
  w = ParamState(jax.device_put(jnp.arange(N * 3.0).reshape(N, 3), NamedSharding(mesh, P('i'))))
  scale = ShortTermState(jax.device_put(jnp.full(3, 2.0), NamedSharding(mesh, P())))
  traces = []

  def step(v, y):
    traces.append('start')
    w.value = w.value * 0.5 + v * scale.value
    traces.append('end')
    return v.sum() + y.sum()

  f = vmap2(step, axis_name='i', state_in_axes={0: ParamState}, state_out_axes={0: ParamState})
  x = jnp.arange(N * 3.0).reshape(N, 3) / 10
  runs = []
  for width in (2, 5, 2):
    traces.clear()
    out = f(x, jnp.ones((N, width)))
    runs.append(list(traces))
    close(out, np.asarray(x).sum(1) + width)
  assert runs == [['start', 'start', 'end'], ['start', 'end'], []]
  want = np.arange(N * 3.0).reshape(N, 3)
  for _ in range(3):
    want = want * 0.5 + np.asarray(x) * 2
  close(w.value, want)
  assert str(jax.typeof(w.value)) == f'float32[{N}@i,3]'


def test_pmap2_in_pmap2_without_meshes_traces_a_new_signature_once():
  # The first call's outer discovery stops where the inner pmap2 asks for its axis, and starts
  # again on a mesh with it; the outer mapping keeps that axis for later signatures.
  traces = []

  def inner(v):
    traces.append('inner')
    return v * 2 + lax.axis_index('m')

  g = pmap2(inner, axis_name='m')

  def outer(block):
    traces.append('outer')
    return g(block) + lax.axis_index('d')

  f = pmap2(outer, axis_name='d')
  runs = []
  for width in (3, 5, 3):
    traces.clear()
    x = np.arange(N * width, dtype=np.float32).reshape(2, N // 2, width)
    out = f(jnp.asarray(x))
    runs.append(list(traces))
    d, m = np.divmod(np.arange(N), N // 2)
    close(out, x * 2 + (m + d).reshape(2, N // 2, 1))
  assert runs == [['outer', 'outer', 'inner'], ['outer', 'inner'], []]


def _jit_on_explicit_mesh(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = mesh_2x4('make_mesh')
  w = ParamState(jax.device_put(jnp.arange(12.0).reshape(3, 4),
                                NamedSharding(mesh, P(None, 'model'))))
  count, traces = State(jax.device_put(jnp.zeros(()), NamedSharding(mesh, P()))), []

  def step(x):
    traces.append(1)
    w.value = w.value - 0.01 * x.T @ (x @ w.value)
    count.value = count.value + 1
    return (x @ w.value).sum()

  f = jit(step)
  x = jnp.arange(12.0).reshape(4, 3) / 10
  outs = [f(x), f(x), f(x)]
  monkeypatch.undo()
  return outs, (w.value, count.value), len(traces)


def test_jit_on_an_explicit_mesh_traces_once(monkeypatch):
  # jit's body sees whole values: discovery traces them with their Explicit types.
  outs, states = _one_trace_equals_two(_jit_on_explicit_mesh, monkeypatch)
  assert str(jax.typeof(states[0])) == 'float32[3,4@model]' and float(states[1]) == 3.0


def _on_model_axis(kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = mesh_2x4(kind)
  w = ParamState(jax.device_put(jnp.arange(12.0).reshape(3, 4),
                                NamedSharding(mesh, P(None, 'model'))))
  rng, traces = RandomState(5), []

  def step(x):
    traces.append(1)
    grad = lax.pmean(x.T @ (x @ w.value), 'data')
    w.value = w.value - 0.01 * grad
    return x.sum() + rng.uniform() + lax.axis_index('data')

  f = pmap2(step, axis_name='data', mesh=mesh)
  x = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3) / 30
  outs = [f(x), f(x)]
  monkeypatch.undo()
  return outs, w.value, len(traces)


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_pmap2_on_a_partly_manual_mesh_traces_once(kind, monkeypatch):
  # With Explicit axes, 'model' stays in the body's types: discovery's lanes carry it too.
  outs, w = _one_trace_equals_two(_on_model_axis, kind, monkeypatch)
  assert w.sharding.spec == P(None, 'model')
  first = np.asarray(outs[0])
  assert not np.allclose(first[0], first[1])   # each lane draws its own number


def _typed_shard_map(kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = mesh_2x4(kind)
  w = ParamState(jnp.arange(16.0).reshape(4, 4))
  count, rng, traces = State(jnp.zeros(())), RandomState(9), []

  def step(x):
    traces.append(1)
    w.value = w.value + lax.psum(x.sum(), 'data')
    count.value = count.value + 1
    return x * w.value[0, 0] + rng.uniform()

  f = shard_map(step, mesh, P('data', 'model'), P('data', 'model'),
                state_in_specs={w: P(None, 'model')}, state_out_specs={w: P(None, 'model')})
  x = jnp.arange(32.0).reshape(4, 8) / 10
  outs = [f(x), f(x)]
  monkeypatch.undo()
  return outs, (w.value, count.value), len(traces)


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_checked_shard_map_traces_once(kind, monkeypatch):
  outs, states = _one_trace_equals_two(_typed_shard_map, kind, monkeypatch)
  assert float(states[1]) == 2.0


def _unchecked_explicit_shard_map(monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh, spec = mesh_2x4('make_mesh'), P('data', 'model')
  w = ParamState(jax.device_put(jnp.arange(16.0).reshape(4, 4), NamedSharding(mesh, spec)))
  count, rng, traces = State(jnp.zeros(())), RandomState(1), []

  def step(x):
    traces.append(1)
    total = lax.psum(x.sum(), ('data', 'model'))
    ramp = jnp.zeros_like(x) + jnp.arange(x.shape[1])
    carry = lax.scan(lambda a, _: (a * 0.5 + w.value, a.sum()), x, None, 2)[0]
    w.value = w.value + total + lax.cond(total > 0, lambda: 1.0, lambda: 0.0) + ramp
    count.value = count.value + lax.pmean(x.mean(), ('data', 'model'))
    return carry * 2 + rng.uniform() + lax.axis_index('model')

  f = shard_map(step, mesh, spec, spec, state_in_specs={w: spec}, state_out_specs={w: spec},
                check_vma=False)
  x = jnp.arange(16.0).reshape(4, 4) / 10
  outs = [np.asarray(f(x)), np.asarray(f(x + 1))]
  monkeypatch.undo()
  return outs, (w.value, count.value), len(traces)


def test_unchecked_shard_map_over_every_axis_of_an_explicit_mesh_traces_once(monkeypatch):
  outs, states = _one_trace_equals_two(_unchecked_explicit_shard_map, monkeypatch)
  assert jax.typeof(states[0]).sharding.spec == P('data', 'model')


def _model_sharded_step(kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  f, states, traces = _model_sharded(kind)
  x = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3) / 30
  outs = [np.asarray(f(x)), np.asarray(f(x + 1))]
  monkeypatch.undo()
  return outs, tuple(s.value for s in states), len(traces)


def _model_sharded(kind, mesh_kind='make_mesh'):
  """A model-sharded training step on a 2 x 4 mesh, Explicit unless `mesh_kind='Mesh'`:
  (f, its states, traces list)."""
  mesh = mesh_2x4(mesh_kind)
  w = ParamState(jax.device_put(jnp.arange(12.0).reshape(3, 4) / 10,
                                NamedSharding(mesh, P(None, 'model'))))
  h = ShortTermState(jax.device_put(jnp.zeros((2, 5, 4)), NamedSharding(mesh, P('data', None,
                                                                                'model'))))
  count, rng, traces = State(jnp.zeros(())), RandomState(1), []

  def step(x):
    traces.append(1)
    grad = lax.pmean(jax.grad(lambda w: jnp.mean((x @ w) ** 2))(w.value), 'data')
    w.value = w.value - 0.1 * grad
    carry = lax.scan(lambda a, _: (a * 0.5 + x @ w.value, None), h.value, None, 2)[0]
    h.value = jax.jit(lambda a: a + 1)(carry)
    count.value = count.value + lax.psum(x.sum(), 'data')
    return (x @ w.value).sum() + rng.uniform() + lax.axis_index('data')

  if kind == 'pmap2':
    f = pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: h}, state_out_axes={0: h})
  else:   # the same step per 'data' block; states laid out by their specs (w replicated)
    f = shard_map(lambda xb: step(xb[0])[None], mesh, P('data'), P('data'),
                  state_in_specs={h: P('data'), w: P()}, state_out_specs={h: P('data'), w: P()},
                  axis_names={'data'}, check_vma=kind == 'shard_map checked')
  return f, (w, h, count), traces


@pytest.mark.parametrize('kind', ['pmap2', 'shard_map', 'shard_map checked'])
def test_model_sharded_states_on_an_explicit_mesh_trace_once(kind, monkeypatch):
  # 'model' stays Explicit in the body: discovery types each lane by the axes it keeps there.
  # A state keeps its layout over 'model', which the specs (over 'data') do not name.
  outs, states = _one_trace_equals_two(_model_sharded_step, kind, monkeypatch)
  want = ['float32[3,4@model]', 'float32[2@data,5,4@model]']
  assert [str(jax.typeof(s)) for s in states[:2]] == want


def _model_typed_argument(kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = mesh_2x4('make_mesh')
  w, count, traces = ParamState(jnp.arange(4.0)), State(jnp.zeros(())), []

  def step(x):
    traces.append(1)
    count.value = count.value + lax.psum(x.sum(), 'data')
    w.value = w.value + 1
    return lax.scan(lambda a, _: (a * 0.5 + w.value, None), x, None, 2)[0]

  if kind.startswith('shard_map'):
    f = shard_map(step, mesh, P('data'), P('data'), axis_names={'data'},
                  check_vma=kind == 'shard_map checked')
  else:
    f = pmap2(step, axis_name='data', mesh=mesh)
  x = jax.device_put(jnp.arange(64.0).reshape(2, 8, 4) / 30,
                     NamedSharding(mesh, P('data', 'model', None)))
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, (w.value, count.value), len(traces)


@pytest.mark.parametrize('kind', ['pmap2', 'shard_map', 'shard_map checked'])
def test_an_argument_sharded_over_an_automatic_explicit_axis_traces_once(kind, monkeypatch):
  # x keeps its 'model' layout inside the body: discovery's lane of it is typed so too.
  outs, states = _one_trace_equals_two(_model_typed_argument, kind, monkeypatch)
  assert str(jax.typeof(outs[0])) == 'float32[2@data,8@model,4]'



def _several_lanes_per_device(axes, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  mesh = mesh_2x4('make_mesh') if axes == '2x4' else jax.make_mesh((8,), ('data',))
  lanes = 2 * mesh.shape['data']
  w, rng, traces = ParamState(jnp.ones((lanes, 3))), RandomState(5), []

  def step(x):
    traces.append(1)
    w.value = w.value * 2 + x   # no collective: JAX cannot batch one there (docs/conformance.md)
    return x + rng.uniform() + lax.axis_index('data')

  f = pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: w}, state_out_axes={0: w})
  x = jnp.arange(lanes * 3.0).reshape(lanes, 3)
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, (w.value, rng.value), len(traces)


@pytest.mark.parametrize('axes', ['1-D', '2x4'])
def test_several_lanes_per_device_on_an_explicit_mesh_trace_once(axes, monkeypatch):
  # The program is a vmap under the whole mesh: discovery is traced under it too, so that what
  # the lifted trace batches there (lane keys, axis_index, the draws' jitted functions) is
  # typed by its Explicit axes.
  outs, (w, _) = _one_trace_equals_two(_several_lanes_per_device, axes, monkeypatch)
  lanes = np.arange(len(w))
  draws = np.asarray(outs[0])[:, 0] - lanes * 3 - lanes   # minus x and axis_index
  assert len(np.unique(draws.round(5))) == len(w)   # each lane its own key
  assert ((draws >= 0) & (draws < 1)).all()
  assert outs[0].sharding.spec[0] == 'data' and w.sharding.spec[0] == 'data'


_LOOPS = {
    'jit(for_loop)': lambda f, x: jit(lambda x: meshstate.transform.for_loop(
        lambda i: f(x * i), jnp.arange(1.0, 4.0)))(x),
    'scan': lambda f, x: meshstate.transform.scan(lambda c, i: (c + f(x * i).sum(), None),
                                                  0.0, jnp.arange(2.0))[0],
    'jit(cond)': lambda f, x: jit(lambda x: meshstate.transform.cond(
        x.sum() > 0, lambda: f(x), lambda: f(-x)))(x),
}


def _looped(loop, kind, monkeypatch, lift):
  """A mapped training step called in a loop (an epoch): its body traced inside the loop's."""
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  if kind in ('pmap2', 'vmap2'):
    s, traces = _states(), []

    def body(x):
      traces.append(1)
      w = s['w'].value
      g = lax.pmean(jax.grad(lambda w: jnp.sum((w * x - s['tree'].value['a']) ** 2))(w), 'i')
      s['w'].value = w - 0.1 * g
      s['total'].value = s['total'].value + lax.psum(x.sum(), 'i')
      return x * s['w'].value + s['rng'].uniform()

    f = (pmap2 if kind == 'pmap2' else vmap2)(body, axis_name='i', state_in_axes={0: s['w']},
                                              state_out_axes={0: s['w']})
    states, x = tuple(s.values()), jnp.arange(N * 3.0).reshape(N, 3) / 10
  else:
    kind, on = kind.split(' on an ')
    f, states, traces = _model_sharded(kind, 'Mesh' if on == 'Auto mesh' else 'make_mesh')
    x = jnp.arange(2 * 5 * 3.0).reshape(2, 5, 3) / 30
  outs = _LOOPS[loop](f, x)
  monkeypatch.undo()
  return outs, jax.tree.map(np.asarray, [st.value for st in states]), len(traces)


@pytest.mark.parametrize('loop, kind', [
    ('jit(for_loop)', 'pmap2'), ('scan', 'pmap2'), ('jit(cond)', 'pmap2'),
    ('jit(for_loop)', 'vmap2'), ('jit(for_loop)', 'pmap2 on an Explicit mesh'),
    ('scan', 'shard_map checked on an Auto mesh'),
    ('jit(for_loop)', 'shard_map checked on an Explicit mesh'),
    ('scan', 'shard_map on an Explicit mesh')])
def test_a_mapped_step_inside_a_loop_traces_once(loop, kind, monkeypatch):
  # The step's body is traced inside the loop's: its state reads are the enclosing trace's
  # values, and they are lifted to the program's inputs as at the top level.
  outs, states = _one_trace_equals_two(_looped, loop, kind, monkeypatch)
  assert np.isfinite(np.asarray(outs)).all()


def _nested_run(outer_kind, inner_kind, mesh_kind, monkeypatch, lift):
  if not lift:
    monkeypatch.setattr(_engine, 'Reader', _NoLift)
  count = State(jnp.zeros(()))
  f, traces = nested_step(outer_kind.split()[-1], inner_kind, mesh_2x4(mesh_kind), count,
                          outer_check=outer_kind == 'shard_map')
  x = jnp.arange(N * 3.0).reshape(N, 3) / 10
  outs = [f(x), f(x + 1)]
  monkeypatch.undo()
  return outs, count.value, traces


@pytest.mark.parametrize('mesh_kind', ['Mesh', 'make_mesh'])
@pytest.mark.parametrize('inner_kind', ['pmap2', 'shard_map'])
@pytest.mark.parametrize('outer_kind', ['shard_map', 'unchecked shard_map', 'pmap2'])
def test_a_mapping_nested_in_another_traces_once(outer_kind, inner_kind, mesh_kind, monkeypatch):
  # The enclosing discovery is traced on the program's (partly manual) mesh, where the nested
  # mapping builds the program it runs: each body is traced once, the enclosing trace is the
  # program, and the nested one's is the program nested in it.
  args = outer_kind, inner_kind, mesh_kind, monkeypatch
  outs, count, traces = _nested_run(*args, lift=True)
  outs2, count2, traces2 = _nested_run(*args, lift=False)
  assert traces == {'outer': 1, 'inner': 1}
  assert traces2['outer'] == 2 and traces2['inner'] >= 2
  jax.tree.map(close, outs, outs2)
  close(count, count2)
  x = np.arange(N * 3.0).reshape(N, 3) / 10
  close(outs[1], nested_want(x + 1))
  close(count, 2 * x.sum() + N * 3)
