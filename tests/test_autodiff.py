"""grad, value_and_grad, vjp, jacrev, jacfwd: results against jax's own, states passed by hand."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import meshstate
from meshstate.transform import (for_loop, grad, jacfwd, jacrev, jit, pmap2, value_and_grad, vjp,
                                 vmap2)
from helpers import N, close, no_tracer, rand

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None)


def _tree_close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a),
                                                         jax.tree.structure(b))
  jax.tree.map(close, a, b)


def _net():
  """A tiny model: weights `w`, bias `b`, running mean `stat` written on every call."""
  w, b = meshstate.ParamState(rand(3, 2)), meshstate.ParamState(rand(2))
  stat = meshstate.LongTermState(jnp.zeros(2))

  def loss(x, scale):
    h = x @ w.value + b.value
    stat.value = 0.9 * stat.value + 0.1 * h.mean(0)
    return jnp.sum(jnp.tanh(h) ** 2) * scale, h.mean()

  def ref(wv, bv, x, scale):
    h = x @ wv + bv
    return jnp.sum(jnp.tanh(h) ** 2) * scale, h.mean()

  return (w, b, stat), loss, ref


@pytest.mark.parametrize('container', ['state', 'list', 'tuple', 'dict'])
def test_grad_states_keep_their_container(container):
  (w, b, stat), loss, ref = _net()
  x, stat0 = rand(4, 3), stat.value
  grad_states = {'state': w, 'list': [w, b], 'tuple': (w, b), 'dict': {'w': w, 'b': b}}[container]
  g = grad(lambda x: loss(x, 2.)[0], grad_states=grad_states)(x)
  gw, gb = jax.grad(lambda wv, bv: ref(wv, bv, x, 2.)[0], argnums=(0, 1))(w.value, b.value)
  expect = {'state': gw, 'list': [gw, gb], 'tuple': (gw, gb), 'dict': {'w': gw, 'b': gb}}
  _tree_close(g, expect[container])
  close(stat.value, 0.9 * stat0 + 0.1 * (x @ w.value + b.value).mean(0))   # written back
  no_tracer(w, b, stat)


@SETTINGS
@given(which=st.lists(st.booleans(), min_size=2, max_size=2),
       argnums=st.sampled_from([None, 0, 1, (0,), (1, 0)]),
       return_value=st.booleans(), has_aux=st.booleans())
def test_grad_result_conventions(which, argnums, return_value, has_aux):
  """Random grad_states subsets, argnums, return_value and has_aux against jax.grad."""
  (w, b, stat), loss, ref = _net()
  chosen = [s for s, on in zip((w, b), which) if on]
  grad_states = chosen or None
  x, scale = rand(4, 3), jnp.float32(1.5)
  fun = (lambda x, s: loss(x, s)) if has_aux else (lambda x, s: loss(x, s)[0])
  got = grad(fun, grad_states=grad_states, argnums=argnums, return_value=return_value,
             has_aux=has_aux)(x, scale)

  nums = 0 if argnums is None and grad_states is None else argnums
  flat_nums = () if nums is None else ((nums,) if isinstance(nums, int) else nums)

  def pure(state_vals, arg_vals):
    vals = dict(zip([id(s) for s in chosen], state_vals))
    full = [x, scale]
    for i, v in zip(flat_nums, arg_vals):
      full[i] = v
    value, aux = ref(vals.get(id(w), w.value), vals.get(id(b), b.value), *full)
    return value, (value, aux)

  (g_states, g_args), (value, aux) = jax.grad(pure, argnums=(0, 1), has_aux=True)(
      [s.value for s in chosen], tuple([x, scale][i] for i in flat_nums))
  arg_grads = None if nums is None else (g_args[0] if isinstance(nums, int) else tuple(g_args))
  if grad_states is None:
    grads = arg_grads
  elif nums is None:
    grads = list(g_states)
  else:
    grads = (list(g_states), arg_grads)
  expect = ((grads, value, aux) if return_value and has_aux else (grads, aux) if has_aux
            else (grads, value) if return_value else grads)
  _tree_close(got, expect)


def test_value_and_grad_and_jacobians():
  (w, b, stat), loss, ref = _net()
  x = rand(4, 3)
  v, (gw, gx) = value_and_grad(lambda x: loss(x, 1.)[0], grad_states=w, argnums=0)(x)
  v_ref, (gw_ref, gx_ref) = jax.value_and_grad(lambda wv, x: ref(wv, b.value, x, 1.)[0],
                                               argnums=(0, 1))(w.value, x)
  close(v, v_ref)
  close(gw, gw_ref)
  close(gx, gx_ref)
  (v, aux), gb = value_and_grad(lambda x: loss(x, 1.), grad_states=b, has_aux=True)(x)
  close(aux, ref(w.value, b.value, x, 1.)[1])

  def vec(x):
    stat.value = stat.value + 1.
    return jnp.tanh(x @ w.value + b.value).ravel()

  def vec_ref(wv, x):
    return jnp.tanh(x @ wv + b.value).ravel()

  before = stat.value
  for ours, theirs in ((jacrev, jax.jacrev), (jacfwd, jax.jacfwd)):
    jw, jx = ours(vec, grad_states=w, argnums=0)(x)
    jw_ref, jx_ref = theirs(vec_ref, argnums=(0, 1))(w.value, x)
    close(jw, jw_ref)
    close(jx, jx_ref)
    (jac, value) = ours(vec, grad_states={'w': w}, return_value=True)(x)
    close(jac['w'], jw_ref)
    close(value, vec_ref(w.value, x))
  close(stat.value, before + 4.)   # one write per call


def test_vjp():
  (w, b, stat), loss, ref = _net()
  x, ct = rand(4, 3), rand(4, 2)

  def f(x):
    stat.value = stat.value + 1.
    return jnp.sin(x @ w.value + b.value)

  out, pull = vjp(f, x, grad_states=[w, b])
  out_ref, pull_ref = jax.vjp(lambda wv, bv, x: jnp.sin(x @ wv + bv), w.value, b.value, x)
  close(out, out_ref)
  (gw, gb), gx = pull(ct)
  gw_ref, gb_ref, gx_ref = pull_ref(ct)
  _tree_close((gw, gb, gx), (gw_ref, gb_ref, gx_ref))
  assert float(stat.value[0]) == 1.
  out, pull, aux = vjp(lambda: (jnp.sin(w.value), 7), grad_states=w, has_aux=True)
  close(pull(jnp.ones((3, 2))), jnp.cos(w.value))
  assert aux == 7


def test_errors_name_the_problem_and_keep_states():
  (w, b, stat), loss, ref = _net()
  stat0 = stat.value
  with pytest.raises(TypeError, match=r"grad_states\['a'\] is of type int, not a State"):
    grad(lambda: 1., grad_states={'a': 1})()
  steps = meshstate.State(jnp.int32(0), name='steps')
  with pytest.raises(TypeError, match="State 'steps' in grad_states holds int32"):
    grad(lambda: steps.value * 1., grad_states=steps)()
  with pytest.raises(ValueError, match='argnums contains 2, but the function was called with 2'):
    grad(lambda x, s: loss(x, s)[0], argnums=2)(rand(4, 3), 1.)
  with pytest.raises(TypeError, match=r'has_aux=True\): the function must return a pair'):
    grad(lambda x: loss(x, 1.)[0], grad_states=w, has_aux=True)(rand(4, 3))

  def boom(x):
    loss(x, 1.)
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    grad(boom, grad_states=w)(rand(4, 3))
  close(stat.value, stat0)
  no_tracer(w, b, stat)
  # Under a raw jax transform, a write is refused with the meshstate equivalent named.
  with pytest.raises(meshstate.StateTraceError, match='meshstate.transform.jit'):
    jax.jit(lambda x: grad(lambda x: loss(x, 1.)[0], grad_states=w)(x))(rand(4, 3))
  close(stat.value, stat0)


# -- composition -----------------------------------------------------------------------------------

def test_grad_inside_meshstate_jit_writes_back():
  (w, b, stat), loss, ref = _net()
  x, stat0 = rand(4, 3), stat.value
  step = jit(grad(lambda x: loss(x, 1.)[0], grad_states={'w': w, 'b': b}, return_value=True))
  for _ in range(2):
    g, v = step(x)
    close(g['w'], jax.grad(lambda wv: ref(wv, b.value, x, 1.)[0])(w.value))
    close(v, ref(w.value, b.value, x, 1.)[0])
  h_mean = (x @ w.value + b.value).mean(0)
  close(stat.value, 0.81 * stat0 + 0.19 * h_mean)
  no_tracer(w, b, stat)


def test_grad_through_pmap2_forward_equals_jax_grad():
  """Replicated params through a pmap2 forward that also updates running statistics."""
  p, stat = meshstate.ParamState(rand(3)), meshstate.LongTermState(jnp.zeros(3))

  @pmap2(axis_name='i')
  def fwd(x):
    h = x @ jnp.diag(p.value)
    stat.value = 0.9 * stat.value + 0.1 * lax.pmean(h.mean(0), 'i')
    return jnp.tanh(h)

  x = rand(N, 5, 3)

  def loss():
    return (fwd(x) ** 2).mean()

  g_ref = jax.grad(lambda pv: (jnp.tanh(x * pv) ** 2).mean())(p.value)
  batch_mean = (x * p.value).mean((0, 1))
  close(grad(loss, grad_states=p)(), g_ref)
  close(stat.value, 0.1 * batch_mean)
  close(jit(grad(loss, grad_states=p))(), g_ref)
  close(stat.value, 0.19 * batch_mean)
  no_tracer(p, stat)


def test_grad_inside_pmap2_and_vmap2_bodies():
  q = meshstate.ParamState(rand(3))
  seen = meshstate.State(jnp.zeros(()))
  x = rand(N, 3)

  def body(x):
    g = grad(lambda: jnp.sum(jnp.sin(x * q.value)), grad_states=q)()
    seen.value = seen.value + 1.
    return g

  per_example = jax.vmap(jax.grad(lambda qv, x: jnp.sum(jnp.sin(x * qv))), (None, 0))(q.value, x)
  close(pmap2(body, axis_name='i')(x), per_example)
  close(vmap2(body)(x), per_example)
  assert float(seen.value) == 2.


def test_bptt_through_for_loop_under_jit():
  """grad of a loss accumulated over a for_loop that writes a hidden state (BPTT)."""
  w, h = meshstate.ParamState(rand(3)), meshstate.HiddenState(jnp.zeros(3))
  xs = rand(6, 3)

  def loss(xs):
    def step(x):
      h.value = jnp.tanh(h.value * w.value + x)
      return jnp.sum(h.value ** 2)
    return for_loop(step, xs).sum()

  def ref(wv, xs):
    def step(hv, x):
      hv = jnp.tanh(hv * wv + x)
      return hv, jnp.sum(hv ** 2)
    hv, ls = lax.scan(step, jnp.zeros(3), xs)
    return ls.sum(), hv

  g, v = jit(grad(loss, grad_states=w, return_value=True))(xs)
  (v_ref, h_ref), g_ref = jax.value_and_grad(ref, has_aux=True)(w.value, xs)
  close(g, g_ref)
  close(v, v_ref)
  close(h.value, h_ref)
  no_tracer(w, h)
