"""for_loop, scan, while_loop, cond, switch, checkpoint: each against hand-written pure JAX."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import meshstate
from meshstate.transform import (ProgressBar, checkpoint, cond, for_loop, grad, jit, pmap2, remat,
                                 scan, shard_map, switch, vmap2, while_loop)
from helpers import N, close, mesh_2x4, no_tracer, rand

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None)


# -- single transforms against lax -----------------------------------------------------------------

def test_for_loop_matches_scan_by_hand():
  h, w = meshstate.HiddenState(rand(3)), meshstate.ParamState(rand(3))
  xs, h0, w0 = rand(5, 3), h.value, w.value

  def step(x):
    h.value = jnp.tanh(h.value * w.value + x)
    return h.value.sum()

  ys = for_loop(step, xs)

  def ref(h, x):
    h = jnp.tanh(h * w0 + x)
    return h, h.sum()

  h_ref, ys_ref = lax.scan(ref, h0, xs)
  close(ys, ys_ref)
  close(h.value, h_ref)
  close(w.value, w0)     # only read: unchanged
  no_tracer(h, w)


@SETTINGS
@given(length=st.integers(0, 7), reverse=st.booleans(), unroll=st.sampled_from([1, 2, True]))
def test_scan_random_lengths(length, reverse, unroll):
  acc, seen = meshstate.State(jnp.ones(2)), meshstate.State(jnp.zeros((), jnp.int32))
  xs = jnp.arange(length * 2, dtype=jnp.float32).reshape(length, 2)

  def f(c, x):
    acc.value = acc.value * 0.5 + x + c
    seen.value = seen.value + 1
    return c + 1., acc.value * 2

  c, ys = scan(f, 0., xs, reverse=reverse, unroll=unroll)

  def ref(carry, x):
    c, a, n = carry
    a = a * 0.5 + x + c
    return (c + 1., a, n + 1), a * 2

  (c_ref, a_ref, n_ref), ys_ref = lax.scan(ref, (0., jnp.ones(2), jnp.int32(0)), xs,
                                           reverse=reverse)
  close(c, c_ref)
  close(ys, ys_ref)
  close(acc.value, a_ref)
  assert int(seen.value) == int(n_ref) == length


def test_nested_loop_is_recorded_by_the_enclosing_jit():
  """Inside a meshstate jit, the loop reads and writes through the jit's frame."""
  h, w = meshstate.HiddenState(jnp.zeros(2)), meshstate.ParamState(jnp.ones(2))

  @jit
  def run(xs):
    return for_loop(lambda x: setattr(h, 'value', h.value + x * w.value), xs)

  run(jnp.ones((3, 2)))
  run(jnp.ones((3, 2)))   # the cached program reads the state the first call wrote
  assert set(run.touched_states()) == {h, w}
  assert h.value.tolist() == [6., 6.]


def test_for_loop_with_length_only_and_several_xs():
  k = meshstate.State(jnp.zeros(()))

  def tick():
    k.value = k.value + 2.
    return k.value

  assert for_loop(tick, length=3).tolist() == [2., 4., 6.]
  out = for_loop(lambda a, b: a * b['v'], jnp.arange(3.), {'v': jnp.full(3, 2.)})
  assert out.tolist() == [0., 2., 4.]


def test_while_loop_matches_lax():
  n, total = meshstate.State(jnp.int32(0)), meshstate.State(rand(2))
  t0 = total.value

  def body(x):
    n.value = n.value + 1
    total.value = total.value + x
    return x * 1.5

  out = while_loop(lambda x: (x < 20.) & (n.value < 100), body, 1.)

  def ref_body(c):
    x, n, t = c
    return x * 1.5, n + 1, t + x

  x_ref, n_ref, t_ref = lax.while_loop(lambda c: (c[0] < 20.) & (c[1] < 100), ref_body,
                                       (1., jnp.int32(0), t0))
  close(out, x_ref)
  assert int(n.value) == int(n_ref)
  close(total.value, t_ref)


def test_while_loop_cond_reads_a_state_the_body_writes():
  n = meshstate.State(jnp.int32(0))

  def body(x):
    n.value = n.value + 1
    return x + n.value

  assert int(while_loop(lambda x: n.value < 4, body, 0)) == 1 + 2 + 3 + 4
  assert int(n.value) == 4


@SETTINGS
@given(writes=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=2, max_size=4),
       index=st.integers(-1, 4))
def test_switch_merges_random_writes(writes, index):
  """Each branch writes a random subset of 4 states; the others keep their values."""
  init = [rand(2) for _ in range(4)]
  states = [meshstate.State(v) for v in init]
  x = rand(2)

  def branch(b, mask):
    def run(x):
      for j, (s, on) in enumerate(zip(states, mask)):
        if on:
          s.value = s.value * (b + 2) + x * j
      return x.sum() * b
    return run

  out = switch(index, [branch(b, m) for b, m in enumerate(writes)], x)

  def ref_branch(b, mask):
    def run(x, vals):
      return x.sum() * b, [v * (b + 2) + x * j if on else v
                           for j, (v, on) in enumerate(zip(vals, mask))]
    return run

  out_ref, vals_ref = lax.switch(index, [ref_branch(b, m) for b, m in enumerate(writes)], x, init)
  close(out, out_ref)
  for s, v in zip(states, vals_ref):
    close(s.value, v)


def test_cond_merges_and_matches_lax():
  a, b = meshstate.State(jnp.zeros(3)), meshstate.State(jnp.ones(3))

  def yes(x):
    a.value = a.value + x
    return x * 2

  def no(x):
    b.value = b.value * x
    return -x

  for x in (rand(3) + 5., rand(3) - 5.):
    a0, b0 = a.value, b.value
    out = cond(x.sum() > 0, yes, no, x)
    out_ref, (a_ref, b_ref) = lax.cond(
        x.sum() > 0, lambda x, a0=a0, b0=b0: (x * 2, (a0 + x, b0)),
        lambda x, a0=a0, b0=b0: (-x, (a0, b0 * x)), x)
    close(out, out_ref)
    close(a.value, a_ref)
    close(b.value, b_ref)


def test_python_scalar_states_are_carried_as_the_written_dtype():
  f, i = meshstate.State(0.), meshstate.State(0)
  for_loop(lambda x: setattr(f, 'value', f.value + x), jnp.arange(4.))
  while_loop(lambda c: c < 3, lambda c: (setattr(i, 'value', i.value + 0.5), c + 1)[1], 0)
  assert f.value.dtype == jnp.float32 and float(f.value) == 6.
  assert i.value.dtype == jnp.float32 and float(i.value) == 1.5


def test_checkpoint_grad_and_writes():
  w, calls = meshstate.ParamState(rand(3)), meshstate.State(jnp.zeros(()))

  @checkpoint
  def layer(x):
    calls.value = calls.value + 1
    return jnp.sin(x * w.value)

  g = grad(lambda x: layer(layer(x)).sum(), grad_states=w)(rand(3) * 0 + 1.)
  w0 = w.value
  g_ref = jax.grad(lambda w: jnp.sin(jnp.sin(1. * w) * w).sum())(w0)
  close(g, g_ref)
  assert float(calls.value) == 2.
  assert remat is checkpoint


def test_checkpoint_static_argnums_and_policy():
  w = meshstate.ParamState(jnp.array(2.))

  def f(x, power):
    return (w.value * x) ** power

  layer = checkpoint(f, static_argnums=1, policy=jax.checkpoint_policies.nothing_saveable)
  g = grad(lambda x: layer(x, 3), grad_states=w, argnums=0)(1.5)
  g_ref = jax.grad(lambda w, x: (w * x) ** 3, argnums=(0, 1))(2., 1.5)
  close(g[0], g_ref[0])
  close(g[1], g_ref[1])


# -- errors ----------------------------------------------------------------------------------------

def test_shape_change_names_the_state_and_keeps_it():
  s = meshstate.State(jnp.zeros(3), name='membrane')
  with pytest.raises(ValueError, match=r"for_loop: State 'membrane' changes shape.*float32\[3\]"
                                       r".*float32\[4\]"):
    for_loop(lambda x: setattr(s, 'value', jnp.append(s.value, x)), jnp.arange(2.))
  assert s.value.shape == (3,)
  t = meshstate.HiddenState(jnp.zeros(2))
  with pytest.raises(ValueError, match=r'while_loop: HiddenState holding float32\[2\] changes '
                                       r'shape or dtype.*int32\[2\]'):
    while_loop(lambda c: c < 2, lambda c: (setattr(t, 'value', t.value.astype(int)), c + 1)[1], 0)
  c = meshstate.State(jnp.zeros(2), name='c')
  with pytest.raises(ValueError, match="cond: State 'c' changes shape"):
    cond(True, lambda: setattr(c, 'value', jnp.zeros(3)), lambda: None)
  assert c.value.shape == (2,) and t.value.dtype == jnp.float32


def test_errors_leave_states_unchanged():
  s = meshstate.State(jnp.zeros(2))

  def boom(x):
    s.value = s.value + x
    raise RuntimeError('boom')

  for run in (lambda: for_loop(boom, jnp.ones((3, 2))),
              lambda: cond(True, boom, lambda x: None, jnp.ones(2)),
              lambda: checkpoint(boom)(jnp.ones(2))):
    with pytest.raises(RuntimeError, match='boom'):
      run()
    assert s.value.tolist() == [0., 0.]
  with pytest.raises(ValueError, match='cond_fun writes State'):
    while_loop(lambda c: (setattr(s, 'value', s.value + 1), c < 2)[1], lambda c: c + 1, 0)
  assert s.value.tolist() == [0., 0.]


def test_bad_arguments():
  with pytest.raises(ValueError, match=r'leading sizes of xs disagree \(xs\[0\] has 3, xs\[1\] '
                                       r'has 4\)'):
    for_loop(lambda a, b: a, jnp.ones(3), jnp.ones(4))
  with pytest.raises(ValueError, match='nothing to loop over'):
    for_loop(lambda: None)
  with pytest.raises(TypeError, match='pbar must be None, an int'):
    for_loop(lambda x: x, jnp.ones(2), pbar='fast')
  with pytest.raises(ValueError, match='freq= must be a positive int'):
    ProgressBar(freq=0)
  with pytest.raises(TypeError, match='non-empty sequence of callables'):
    switch(0, [])
  name = meshstate.State('a string')
  with pytest.raises(TypeError, match="cannot be carried through for_loop"):
    for_loop(lambda x: setattr(name, 'value', 'b'), jnp.ones(2))


def test_raw_jax_transform_gets_a_clear_error():
  s = meshstate.State(jnp.zeros(()))

  def step(x):
    s.value = s.value + x

  for raw in (jax.jit, jax.checkpoint):
    with pytest.raises(meshstate.StateTraceError, match='meshstate.transform.jit'):
      raw(lambda xs: for_loop(step, xs))(jnp.ones(3))
    no_tracer(s)
  # A loop that only reads states is fine under raw JAX transforms.
  assert float(jax.jit(lambda xs: for_loop(lambda x: x + s.value, xs).sum())(jnp.ones(3))) == 3.


# -- progress --------------------------------------------------------------------------------------

def test_pbar_plain_text_and_int():
  out = io.StringIO()
  for_loop(lambda x: x, jnp.arange(5.), pbar=ProgressBar(freq=2, desc='sim', file=out, tqdm=False))
  jax.effects_barrier()
  assert out.getvalue().splitlines() == ['sim: 2/5', 'sim: 4/5', 'sim: 5/5']
  out = io.StringIO()
  scan(lambda c, x: (c, x), 0, jnp.arange(6), pbar=ProgressBar(count=3, file=out, tqdm=False))
  jax.effects_barrier()
  assert out.getvalue().splitlines() == [f'Running 6 steps: {i}/6' for i in (2, 4, 6)]


def test_pbar_tqdm(capsys):
  for_loop(lambda x: x, jnp.arange(8.), pbar=4)
  jax.effects_barrier()
  assert '8/8' in capsys.readouterr().err


def test_pbar_reports_once_per_step_inside_pmap2():
  out = io.StringIO()
  v = meshstate.State(jnp.zeros(N))

  @pmap2(axis_name='i', state_in_axes={0: v}, state_out_axes={0: v})
  def run(x):
    return for_loop(lambda t: v.value + x, jnp.arange(4.),
                    pbar=ProgressBar(freq=2, desc='d', file=out, tqdm=False))

  run(jnp.ones(N))
  jax.effects_barrier()
  assert out.getvalue().splitlines() == ['d: 2/4', 'd: 4/4']


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_pbar_inside_pmap2_over_one_axis_of_a_2d_mesh(kind):
  # JAX has no host callback in a shard_map body that leaves Explicit axes free: there the
  # loop runs without its bar and says so (it failed with JAX's NotImplementedError).
  out, mesh = io.StringIO(), mesh_2x4(kind)
  c = meshstate.State(jnp.zeros(4))

  @pmap2(axis_name='data', mesh=mesh)
  def run(x):
    def step(i):
      c.value = c.value + jax.lax.pmean(x.sum(), 'data')
    for_loop(step, jnp.arange(4), pbar=ProgressBar(freq=2, desc='d', file=out, tqdm=False))
    return x

  if kind == 'make_mesh':
    with pytest.warns(UserWarning, match='cannot report from a pmap2/shard_map body over some '
                                         'axes of an Explicit-axis mesh') as caught:
      run(jnp.ones((2, 3)))
    assert caught[0].filename == __file__
  else:
    run(jnp.ones((2, 3)))
  jax.effects_barrier()
  close(c.value, np.full(4, 12.0))
  assert out.getvalue().splitlines() == ([] if kind == 'make_mesh' else ['d: 2/4', 'd: 4/4'])


# -- composition -----------------------------------------------------------------------------------

def _model():
  return (meshstate.HiddenState(rand(3)), meshstate.State(jnp.zeros(())),
          meshstate.ParamState(rand(3)))


def _ms_body(states):
  """Every transform in one body: for_loop, cond, while_loop, switch, grad, checkpoint."""
  h, acc, p = states

  def body(xs):
    def step(x):
      h.value = jnp.tanh(h.value * p.value + x)
      cond(h.value.sum() > 0, lambda: setattr(acc, 'value', acc.value + 1), lambda: None)
      return h.value.sum()

    ys = for_loop(step, xs)
    while_loop(lambda i: i < 3, lambda i: (setattr(acc, 'value', acc.value * 1.5), i + 1)[1], 0)
    switch(2, [lambda: None, lambda: None, lambda: setattr(acc, 'value', acc.value - 0.25)])
    g = grad(lambda: jnp.sum(jnp.tanh(h.value * p.value)), grad_states=p)()
    p.value = p.value - 0.1 * g
    out = checkpoint(lambda y: jnp.sin(y.sum() * p.value).sum())(ys)
    return ys, out
  return body


def _ref_body(xs, h, acc, p):
  def step(carry, x):
    h, acc = carry
    h = jnp.tanh(h * p + x)
    acc = lax.cond(h.sum() > 0, lambda a: a + 1, lambda a: a, acc)
    return (h, acc), h.sum()

  (h, acc), ys = lax.scan(step, (h, acc), xs)
  _, acc = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 1.5), (0, acc))
  acc = acc - 0.25
  p = p - 0.1 * jax.grad(lambda p: jnp.sum(jnp.tanh(h * p)))(p)
  out = jax.checkpoint(lambda y, p: jnp.sin(y.sum() * p).sum())(ys, p)
  return (ys, out), (h, acc, p)


def _check(got, ref, states):
  jax.tree.map(close, got, ref[0])
  for s, v in zip(states, ref[1]):
    close(s.value, v)
    no_tracer(s)


@pytest.mark.parametrize('where', ['eager', 'jit'])
def test_all_transforms_unmapped(where):
  states = _model()
  vals, xs = [s.value for s in states], rand(4, 3)
  body = _ms_body(states)
  got = (jit(body) if where == 'jit' else body)(xs)
  _check(got, _ref_body(xs, *vals), states)


@pytest.mark.parametrize('mapper', ['pmap2', 'vmap2'])
def test_all_transforms_inside_a_mapped_body(mapper):
  n = N if mapper == 'pmap2' else 3
  states = [meshstate.State(jnp.stack([s.value] * n) + rand(n, *s.value.shape)) for s in _model()]
  vals, xs = [s.value for s in states], rand(n, 4, 3)
  mapping = pmap2 if mapper == 'pmap2' else vmap2
  kw = {'axis_name': 'i'} if mapper == 'pmap2' else {}
  run = mapping(_ms_body(states), state_in_axes={0: states}, state_out_axes={0: states}, **kw)
  got = run(xs)
  _check(got, jax.vmap(_ref_body)(xs, *vals), states)


def test_all_transforms_under_jit_inside_pmap2():
  states = [meshstate.State(jnp.stack([s.value] * N)) for s in _model()]
  vals, xs = [s.value for s in states], rand(N, 4, 3)
  run = jit(pmap2(_ms_body(states), axis_name='i', state_in_axes={0: states},
                  state_out_axes={0: states}))
  _check(run(xs), jax.vmap(_ref_body)(xs, *vals), states)


def test_for_loop_inside_shard_map_widens_varying_states():
  """Under shard_map's varying-axes typing, a replicated state updated per device is carried."""
  mesh = Mesh(np.array(jax.devices()), ('i',))
  rep, tot = meshstate.State(jnp.zeros(2)), meshstate.State(jnp.zeros(()))

  def body(x):
    def step():
      rep.value = rep.value + x[0]
      tot.value = tot.value + lax.psum(x.sum(), 'i')
    for_loop(step, length=3)
    return x * 2

  f = shard_map(body, mesh=mesh, in_specs=P('i'), out_specs=P('i'), state_out_specs={rep: P('i')})
  x = rand(N, 2)
  close(f(x), x * 2)
  close(rep.value, 3 * x.reshape(-1))
  close(tot.value, 3 * x.sum())


def test_while_loop_trip_count_differs_per_device():
  count = meshstate.State(jnp.zeros(N, jnp.int32))

  @pmap2(axis_name='i', state_in_axes={0: count}, state_out_axes={0: count})
  def run(x):
    def body(y):
      count.value = count.value + 1
      return y * 2
    return while_loop(lambda y: y < 100, body, x)

  x = jnp.arange(1., N + 1)
  out = run(x)

  def ref(x):
    return lax.while_loop(lambda c: c[0] < 100, lambda c: (c[0] * 2, c[1] + 1), (x, 0))

  out_ref, n_ref = jax.vmap(ref)(x)
  close(out, out_ref)
  assert count.value.tolist() == n_ref.tolist()
  assert len(set(n_ref.tolist())) > 1


def _training():
  """A pmap2 data-parallel step on replicated weights, a momentum state and a step counter."""
  w, mom = meshstate.ParamState(rand(3)), meshstate.State(jnp.zeros(3))
  steps = meshstate.State(jnp.int32(0))

  @pmap2(axis_name='i')
  def step(x, y):
    g = grad(lambda: jnp.mean((x @ w.value - y) ** 2), grad_states=w)()
    g = lax.pmean(g, 'i')
    mom.value = 0.9 * mom.value + g
    w.value = w.value - 0.05 * mom.value
    steps.value = steps.value + 1
    return lax.pmean(jnp.mean((x @ w.value - y) ** 2), 'i')

  return (w, mom, steps), step


def test_epoch_of_pmap2_steps_in_one_jit_equals_eager_steps():
  states, step = _training()
  xs, ys = rand(5, N, 4, 3), rand(5, N, 4)
  start = [s.value for s in states]
  eager, after = [], []
  for _ in range(2):   # two epochs, step by step
    eager.append(jnp.stack([step(x, y) for x, y in zip(xs, ys)]))
    after.append([s.value for s in states])
  for s, v in zip(states, start):
    s.value = v
  epoch = jit(lambda xs, ys: for_loop(step, xs, ys))
  for k in range(2):   # the second epoch runs the cached program from the new states
    close(epoch(xs, ys), eager[k])
    for s, v in zip(states, after[k]):
      close(s.value, v)
      no_tracer(s)
  assert int(states[2].value) == 10


def test_cond_and_scan_around_pmap2_calls_under_jit():
  total = meshstate.State(jnp.zeros(N))
  double = pmap2(lambda x: setattr(total, 'value', total.value + 2 * x) or x,
                 axis_name='i', state_in_axes={0: total}, state_out_axes={0: total})
  negate = pmap2(lambda x: setattr(total, 'value', total.value - x) or x,
                 axis_name='i', state_in_axes={0: total}, state_out_axes={0: total})

  @jit
  def run(flags, x):
    def step(c, flag):
      cond(flag, double, negate, x)
      return c + 1, total.value.sum()
    return scan(step, 0, flags)

  flags = jnp.array([True, False, True, True])
  x = rand(N)
  n, sums = run(flags, x)
  ref, t = [], jnp.zeros(N)
  for f in flags.tolist():
    t = t + 2 * x if f else t - x
    ref.append(t.sum())
  assert int(n) == 4
  close(sums, jnp.stack(ref))
  close(total.value, t)


def test_checkpoint_around_pmap2_under_grad():
  w = meshstate.ParamState(rand(3))
  fwd = pmap2(lambda x: jnp.sin(x * w.value), axis_name='i')
  x = rand(N, 3)
  g = jit(grad(lambda: checkpoint(fwd)(x).sum(), grad_states=w))()
  close(g, jax.grad(lambda w: jnp.sin(x * w).sum())(w.value))


def test_nested_loops_and_random_state_match_eager_draws():
  meshstate.random.seed(3)
  draws = [meshstate.random.normal(size=2) for _ in range(7)]
  meshstate.random.seed(3)
  acc = meshstate.State(jnp.zeros(2))

  def inner(j):
    acc.value = acc.value + meshstate.random.normal(size=2)
    return acc.value

  out = for_loop(lambda i: for_loop(inner, jnp.arange(3)), jnp.arange(2))
  close(out.reshape(6, 2), jnp.cumsum(jnp.stack(draws[:6]), 0))
  close(meshstate.random.normal(size=2), draws[6])   # the key advanced exactly 6 times
