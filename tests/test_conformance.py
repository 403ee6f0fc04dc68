"""`pmap2` as a drop-in for `jax.pmap` and brainstate's `pmap2`, and `explain` as the program.

Every expected value comes from `jax.pmap` (or `jax.vmap`) of the same function, or from the
call that `explain` claims to describe.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate import ParamState, ShortTermState, State
from meshstate.random import RandomState
from meshstate.transform import StatefulMapping, pmap2, shard_map, vmap2

from helpers import N, close, mesh_2x4, no_tracer, rand

LR = 0.1
GROUPS = [list(range(N // 2)), list(range(N // 2, N))]


# --- explain(...).run() is the call ----------------------------------------------------------

def _linear_step(w, x, axis):
  """A pmap-style SGD step: per-device grad of a replicated weight, then pmean."""
  def loss(v):
    return jnp.sum((x @ v) ** 2)
  g = jax.grad(loss)(w.value)
  w.value = w.value - LR * lax.pmean(g, axis)
  return lax.pmean(loss(w.value), axis)


def _reference_step(w0, xs):
  """The same step with `jax.pmap`, the weight passed by hand."""
  def step(w, x):
    g = jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w)
    new = w - LR * lax.pmean(g, 'i')
    return new, lax.pmean(jnp.sum((x @ new) ** 2), 'i')
  new, loss = jax.pmap(step, axis_name='i', in_axes=(None, 0), out_axes=(None, 0))(w0, xs)
  return new, loss


def _run_both(make, *args):
  """Outputs and state values of a fresh call, and of `explain(...).run()` on fresh states."""
  f, states = make()
  out = f(*args)
  called = [np.asarray(s.value) for s in states]
  g, states2 = make()
  explanation = g.explain(*args)
  explained = explanation.run()
  no_tracer(*states2)
  return out, called, explained, [np.asarray(s.value) for s in states2], explanation


def _assert_same(out, called, explained, after):
  jax.tree.map(close, out, explained)
  for a, b in zip(called, after):
    close(a, b)


def test_explain_run_equals_pmap2_call_with_grad_and_pmean():
  w0, xs = rand(3, 2), rand(N, 5, 3)

  def make():
    w = ParamState(w0)
    return pmap2(lambda x: _linear_step(w, x, 'i'), axis_name='i'), [w]

  out, called, explained, after, explanation = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  want_w, want_loss = _reference_step(w0, xs)
  close(called[0], want_w)   # not N times the gradient
  close(out, want_loss)
  assert 'check_vma=False' in str(explanation)
  assert repr(explanation) == str(explanation)


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_explain_run_equals_pmap2_on_a_mesh_with_a_model_axis(kind):
  mesh = mesh_2x4(kind)
  w0, xs = rand(3, 8), rand(2, 5, 3)

  def make():
    w = ParamState(jax.device_put(w0, NamedSharding(mesh, P(None, 'model'))))
    return pmap2(lambda x: _linear_step(w, x, 'data'), axis_name='data', mesh=mesh), [w]

  out, called, explained, after, _ = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  want_w, _ = jax.pmap(lambda w, x: _ref_grad_step(w, x), axis_name='data',
                       in_axes=(None, 0), out_axes=None, devices=jax.devices()[:2])(w0, xs)
  close(called[0], want_w)


def _ref_grad_step(w, x, axis='data'):
  g = jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w)
  new = w - LR * lax.pmean(g, axis)
  return new, lax.pmean(jnp.sum((x @ new) ** 2), axis)


def test_explain_run_equals_nested_pmap2():
  w0, xs = rand(3, 2), rand(2, 4, 5, 3)

  def make():
    w = ParamState(w0)

    def inner(x):   # per-lane gradient, averaged over the inner axis
      return lax.pmean(jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w.value), 'j')

    def outer(x):
      g = lax.pmean(pmap2(inner, axis_name='j')(x)[0], 'i')
      w.value = w.value - LR * g
      return g
    return pmap2(outer, axis_name='i'), [w]

  out, called, explained, after, explanation = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  grads = jax.vmap(jax.vmap(lambda x: jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w0)))(xs)
  close(called[0], w0 - LR * grads.mean(axis=(0, 1)))
  assert explanation.mesh.shape == {'i': 2, 'j': 4}


def test_explain_run_equals_pmap2_with_more_lanes_than_devices():
  w0, xs = rand(3, 2), rand(2 * N, 5, 3)

  def make():
    w = ParamState(w0)
    return pmap2(lambda x: _linear_step(w, x, 'i'), axis_name='i'), [w]

  out, called, explained, after, explanation = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  grads = jax.vmap(lambda x: jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w0))(xs)
  close(called[0], w0 - LR * grads.mean(0))
  assert 'jax.vmap(' in explanation.code and 'spmd_axis_name' in explanation.code


def test_explain_run_equals_several_lanes_per_device_on_an_explicit_mesh():
  # The lanes' keys and axis_index are batched over the mesh: the engine traces the vmap under
  # it, and so must the explanation's program, or it fails where the call works.
  mesh, xs = mesh_2x4('make_mesh'), rand(4, 3)

  def make():
    w, rng = ParamState(jnp.ones((4, 3))), RandomState(0)
    step = lambda x: (setattr(w, 'value', w.value * 2 + x),  # noqa: E731
                      x + rng.uniform() + lax.axis_index('data'))[1]
    return pmap2(step, axis_name='data', mesh=mesh, state_in_axes={0: w},
                 state_out_axes={0: w}), [w, rng]

  out, called, explained, after, explanation = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  assert 'use_abstract_mesh' in explanation.code


@pytest.mark.parametrize('check_vma', [True, False])
def test_explain_run_equals_shard_map(check_vma):
  mesh = mesh_2x4('Mesh')
  w0, xs = rand(3, 8), rand(16, 3)

  def make():
    w = ParamState(w0)

    def block(x):   # x: this 'data' shard's rows; w: this device's 'model' columns
      g = jax.grad(lambda v: jnp.sum((x @ v) ** 2))(w.value)
      if not check_vma:   # pmap semantics: the gradient is this shard's own
        g = lax.psum(g, 'data')
      w.value = w.value - LR * g
      return lax.psum(jnp.sum(x), 'data')
    f = shard_map(block, mesh, P('data'), P(), state_in_specs={w: P(None, 'model')},
                  check_vma=check_vma)
    return f, [w]

  out, called, explained, after, explanation = _run_both(make, xs)
  _assert_same(out, called, explained, after)
  g = jax.grad(lambda v: jnp.sum((xs @ v) ** 2))(w0)
  close(called[0], w0 - LR * g)
  assert f'check_vma={check_vma}' in explanation.code


def test_sharding_module_does_not_import_the_engine():
  import ast
  import pathlib
  source = pathlib.Path(meshstate.sharding.__file__).read_text()
  imported = {node.module for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.ImportFrom)}
  assert 'meshstate.transform._engine' not in imported
  assert 'meshstate.transform' not in imported


# --- collectives that the jaxpr-based discovery accepts (vmap refused them) -------------------

COLLECTIVES = {
    'psum_groups': lambda x: lax.psum(x, 'i', axis_index_groups=GROUPS),
    'all_gather_groups': lambda x: lax.all_gather(x, 'i', axis_index_groups=GROUPS),
    'psum_scatter_groups': lambda x: lax.psum_scatter(
        jnp.tile(x, (N // 2, 1)), 'i', axis_index_groups=GROUPS, tiled=True),
    'all_to_all_groups': lambda x: lax.all_to_all(
        jnp.tile(x, (N // 2, 1)), 'i', 0, 0, axis_index_groups=GROUPS),
    'grad_of_psum_groups': lambda x: jax.grad(
        lambda y: jnp.sum(lax.psum(y, 'i', axis_index_groups=GROUPS) ** 2))(x),
    'partial_ppermute': lambda x: lax.ppermute(x, 'i', perm=[(0, 1), (1, 2)]),
}


@pytest.mark.parametrize('name', list(COLLECTIVES))
def test_collective_matches_jax_pmap(name):
  f = COLLECTIVES[name]
  x = rand(N, 4)
  close(pmap2(f, axis_name='i')(x), jax.pmap(f, axis_name='i')(x))


def test_grouped_psum_written_to_a_state_is_gathered_not_treated_as_replicated():
  s = ShortTermState(jnp.zeros(4))
  x = rand(N, 4)

  def step(v):
    s.value = lax.psum(v, 'i', axis_index_groups=GROUPS)

  pmap2(step, axis_name='i', unexpected_out_state_mapping='ignore')(x)
  close(s.value, jax.pmap(lambda v: lax.psum(v, 'i', axis_index_groups=GROUPS),
                          axis_name='i')(x))


def test_halo_exchange_with_a_partial_permutation():
  u = rand(N, 6)

  def halo(v):   # each device sends its right edge to its right neighbour; the first gets 0
    left = lax.ppermute(v[-1:], 'i', [(j, j + 1) for j in range(N - 1)])
    return jnp.concatenate([left, v])

  close(pmap2(halo, axis_name='i')(u), jax.pmap(halo, axis_name='i')(u))


# --- the wrapper looks like the function it wraps ---------------------------------------------

def test_wrapper_keeps_name_doc_and_wrapped():
  def step(x):
    """Doubles x."""
    return x * 2
  f = pmap2(step, axis_name='i')
  assert f.__name__ == 'step' and f.__doc__ == 'Doubles x.' and f.__wrapped__ is step
  assert f.__qualname__ == step.__qualname__ and f.__module__ == step.__module__


def test_first_parameter_is_named_fun():
  import inspect
  assert next(iter(inspect.signature(pmap2).parameters)) == 'fun'
  close(pmap2(fun=lambda x: x + 1, axis_name='i')(jnp.zeros(N)), jnp.ones(N))


class Counter(meshstate.nn.Module):
  def __init__(self):
    super().__init__()
    self.total = ShortTermState(jnp.zeros(()))
    self.scale = ParamState(jnp.full((), 2.0))

  @functools.partial(pmap2, axis_name='d')
  def step(self, x):
    self.total.value = self.total.value + lax.psum(x, 'd')
    return x * self.scale.value


def test_decorated_module_method_binds_self():
  a, b = Counter(), Counter()
  x = jnp.arange(N, dtype=jnp.float32)
  close(a.step(x), x * 2)
  a.step(x)
  b.step(x)
  assert float(a.total.value) == 2 * float(x.sum()) and float(b.total.value) == float(x.sum())
  assert a.step is a.step   # one mapping per object: its cache survives
  paths = meshstate.sharding.describe(a.step).rows
  assert [r['path'] for r in paths] == ['total', 'scale']


# --- arguments checked early, in jax.pmap's terms ---------------------------------------------

def test_empty_devices_is_refused_at_construction():
  with pytest.raises(ValueError, match=r'devices=\[\]'):
    pmap2(lambda x: x, devices=[])


def test_repeated_devices_are_refused_naming_them():
  d = jax.devices()
  with pytest.raises(ValueError, match='repeated devices'):
    pmap2(lambda x: x, devices=[d[0], d[0]])


def test_inputs_on_devices_in_another_order_are_moved():
  devices = jax.devices()[::-1]
  x = jax.device_put(rand(N, 3), NamedSharding(Mesh(np.array(jax.devices()), ('i',)), P('i')))
  f = lambda v: v + lax.axis_index('i')  # noqa: E731
  out = pmap2(f, axis_name='i', devices=devices)(x)
  close(out, jax.pmap(f, axis_name='i', devices=devices)(x))


def test_out_of_range_static_broadcasted_argnums_is_an_error():
  f = pmap2(lambda x, k: x * k, axis_name='i', static_broadcasted_argnums=3)
  with pytest.raises(ValueError, match=r'static_broadcasted_argnums contains 3.*2 positional'):
    f(jnp.ones(N), 2)


def test_static_argnums_attributes_and_none():
  f = StatefulMapping(lambda x, k: x * k, static_argnums=(1,), static_argnames='k')
  assert f.static_argnums == (1,) and f.static_argnames == ('k',)
  g = StatefulMapping(lambda x: x, static_argnums=None, static_argnames=None)
  assert g.static_argnums == () and g.static_argnames == ()
  close(g(jnp.ones(3)), jnp.ones(3))


def test_axis_size_conflicting_with_an_argument_says_so():
  f = pmap2(lambda x: x, axis_name='i', axis_size=N // 2)
  with pytest.raises(ValueError, match=rf'axis_size={N // 2} conflicts with the mapped size '
                                       rf'{N} of args\[0\]'):
    f(jnp.ones((N, 2)))


def test_out_axes_none_on_a_per_device_value_stays_an_error():
  with pytest.raises(ValueError, match='out_axes is None for output'):
    pmap2(lambda x: x, axis_name='i', out_axes=None)(jnp.ones(N))


# --- states holding Python values are static --------------------------------------------------

def test_python_valued_state_is_static_and_rebuilds_when_it_changes():
  flag, traces = State(True), []

  def step(x):
    traces.append(1)
    return x + 1 if flag.value else x - 1

  f = pmap2(step, axis_name='i')
  x = jnp.zeros(N)
  close(f(x), x + 1)
  n = len(traces)
  close(f(x), x + 1)
  assert len(traces) == n   # cached
  flag.value = False
  close(f(x), x - 1)
  assert flag.value is False


def test_python_value_written_by_the_function_is_written_back_each_call():
  mode, seen = State('train'), []

  def step(x):
    seen.append(mode.value)
    mode.value = 'eval'
    return x

  f = vmap2(step)
  f(jnp.zeros(3))
  assert mode.value == 'eval'
  mode.value = 'train'
  f(jnp.zeros(3))
  assert mode.value == 'eval' and seen[0] == 'train'


# --- outputs whose containers carry fresh static objects on every trace -----------------------

class Box:
  """A pytree whose static field is a new object on every construction (like TrainState)."""

  def __init__(self, value, fn):
    self.value, self.fn = value, fn


jax.tree_util.register_pytree_node(Box, lambda b: ((b.value,), b.fn),
                                   lambda fn, children: Box(children[0], fn))


def test_output_with_fresh_static_fields_on_each_trace():
  def create(x):
    return Box(x * 2, lambda y: y)   # a new lambda each trace
  out = pmap2(create, axis_name='i')(jnp.arange(N, dtype=jnp.float32))
  close(out.value, jnp.arange(N) * 2)
  assert callable(out.fn)


# --- the state-aware shard_map takes jax's and brainstate's spellings -------------------------

def _block_double(w):
  def block(x):
    w.value = w.value + 1
    return x * 2
  return block


@pytest.mark.parametrize('spelling', ['positional', 'keyword', 'context'])
def test_shard_map_spellings(spelling):
  mesh = Mesh(np.array(jax.devices()), ('i',))
  w = ShortTermState(jnp.zeros(N))
  x = rand(N, 2)
  if spelling == 'positional':
    f = shard_map(_block_double(w), mesh, P('i'), P('i'), state_in_specs={w: P('i')})
    out = f(x)
  elif spelling == 'keyword':
    f = shard_map(_block_double(w), mesh=mesh, in_specs=P('i'), out_specs=P('i'),
                  state_in_specs={w: P('i')})
    out = f(x)
  else:
    f = shard_map(_block_double(w), in_specs=P('i'), out_specs=P('i'),
                  state_in_specs={w: P('i')})
    with jax.sharding.set_mesh(mesh):
      out = f(x)
  close(out, x * 2)
  close(w.value, jnp.ones(N))
  assert w.spec == P('i')


@pytest.mark.parametrize('kind', ['Mesh', 'make_mesh'])
def test_shard_map_on_the_context_mesh_inside_jit_and_for_loop(kind):
  # Called inside a trace, it reads the context mesh there too ("there is no context mesh"
  # before: JAX's get_mesh refuses to be called while a jit traces).
  mesh = mesh_2x4(kind)
  w = ParamState(jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P(None, 'model'))))
  step = shard_map(lambda x: setattr(w, 'value', w.value + lax.pmean(x.sum(), 'data')) or x,
                   in_specs=P('data'), out_specs=P('data'), axis_names={'data'})
  with jax.sharding.set_mesh(mesh):
    meshstate.transform.jit(lambda xs: meshstate.transform.for_loop(step, xs))(
        jnp.ones((3, 2, 5)))
  close(w.value, np.full((4, 8), 16.0))
  assert w.spec == P(None, 'model')


def test_shard_map_without_any_mesh_says_how_to_give_one():
  f = shard_map(lambda x: x, in_specs=P(), out_specs=P())
  with pytest.raises(ValueError, match='no context mesh'):
    f(jnp.ones(2))


def test_shard_map_axis_names_leaves_other_axes_automatic():
  mesh = mesh_2x4('Mesh')
  s = ShortTermState(jnp.zeros(()))
  x = rand(8, 4)

  def block(v):   # manual over 'data' only: v is this data shard's (4, 4) block
    s.value = s.value + lax.psum(jnp.sum(v), 'data')
    return v * 2

  out = shard_map(block, mesh, P('data'), P('data'), axis_names={'data'})(x)
  close(out, x * 2)
  close(s.value, jnp.sum(x))
