"""Ahead-of-time `lower`/`compile` in the user's terms, and raw JAX transforms around states."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from meshstate import State, StateTraceError
from meshstate.transform import jit, pmap2

from helpers import N, close, no_tracer, rand


def _counter_step():
  total = State(jnp.zeros(()))

  def step(x, scale):
    total.value = total.value + lax.psum(jnp.sum(x), 'i')
    return {'y': x * scale, 'n': lax.psum(1, 'i')}
  return total, step


@pytest.mark.parametrize('abstract', [False, True])
def test_pmap2_compiled_takes_user_arguments_and_writes_states(abstract):
  total, step = _counter_step()
  f = pmap2(step, axis_name='i', static_broadcasted_argnums=1)
  x = rand(N, 3)
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype) if abstract else x
  lowered = f.lower(spec, 2.0)
  args, kwargs = lowered.args_info
  assert kwargs == {} and args[1] is None and args[0].shape == (N, 3)
  assert 'sdy.mesh' in lowered.as_text()   # the sharded program, as StableHLO text
  compiled = lowered.compile()
  assert float(total.value) == 0.0   # lowering and compiling run nothing
  out = compiled(x, 2.0)
  close(out['y'], x * 2.0)
  assert out['n'].tolist() == [N] * N
  close(total.value, jnp.sum(x))
  compiled(x, 2.0)
  close(total.value, 2 * jnp.sum(x))
  assert compiled.cost_analysis() is not None
  assert compiled.memory_analysis().temp_size_in_bytes >= 0


def test_jit_compiled_with_keyword_arguments():
  acc = State(jnp.zeros(2))

  @jit
  def add(x, *, k):
    acc.value = acc.value + x * k
    return acc.value

  compiled = add.lower(jax.ShapeDtypeStruct((2,), jnp.float32), k=jnp.float32(3)).compile()
  close(compiled(jnp.ones(2), k=jnp.float32(3)), jnp.full(2, 3.0))
  close(acc.value, jnp.full(2, 3.0))
  assert set(compiled.args_info[1]) == {'k'}


def test_compiled_called_with_other_shapes_says_so():
  total, step = _counter_step()
  compiled = pmap2(step, axis_name='i', static_broadcasted_argnums=1).lower(
      rand(N, 3), 2.0).compile()
  with pytest.raises(TypeError, match='lower it again'):
    compiled(rand(N, 4), 2.0)
  assert float(total.value) == 0.0


# --- raw JAX transforms around a state-writing call ---------------------------------------------

def _writer():
  s = State(jnp.zeros(()))

  def step(x):
    s.value = s.value + lax.psum(jnp.sum(x), 'i')
    return x * 2
  return s, pmap2(step, axis_name='i')


RAW = {
    'scan': ('jax.lax.scan', 'for_loop/scan',
             lambda f, x: lax.scan(lambda c, _: (f(c), None), x, None, length=2)),
    'grad': ('jax.grad', 'meshstate.transform.grad',
             lambda f, x: jax.grad(lambda v: f(v).sum())(x)),
    'checkpoint': ('jax.checkpoint', 'checkpoint', lambda f, x: jax.checkpoint(f)(x)),
    'vmap': ('jax.vmap', 'vmap2', lambda f, x: jax.vmap(f)(jnp.stack([x, x]))),
}


@pytest.mark.parametrize('name', list(RAW))
@pytest.mark.parametrize('inside_jit', [False, True])
def test_raw_transform_around_a_state_writing_call_names_the_equivalent(name, inside_jit):
  raw, ours, run = RAW[name]
  s, f = _writer()
  x = jnp.ones(N)
  call = (lambda: jit(lambda: run(f, x))()) if inside_jit else (lambda: run(f, x))
  with pytest.raises(StateTraceError) as err:
    call()
  assert raw in str(err.value) and ours in str(err.value)
  no_tracer(s)
  assert float(s.value) == 0.0
  f(x)   # still works afterwards
  assert float(s.value) == N


def test_nested_pmap2_under_grad_counts_each_axis_once():
  w = jnp.float32(1.5)
  x = rand(2, N // 2, 3)

  def loss(w, x):
    outer = pmap2(lambda xo: pmap2(lambda xi: (w * xi).sum(), axis_name='j')(xo),
                  axis_name='i')
    return outer(x).sum()

  close(jax.grad(loss)(w, x), np.asarray(x).sum())
