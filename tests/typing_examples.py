"""The public API as a user's code uses it, for the type checker (pyright, in `.ci/run`).

Every form here must type-check with 0 errors: the decorator and call forms of the transforms
give objects with `explain`, `lower` and the mapping's settings, not bare callables.
tests/test_typing.py also runs each function, so the examples stay true at run time.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

import meshstate
from meshstate.sharding import Explanation, StateTable
from meshstate.transform import (StatefulMapping, StatefulShardMap, checkpoint, for_loop, grad,
                                 jit, pmap2, scan, shard_map, value_and_grad, vmap2)
from meshstate.util.filter import OfType, PathContains


class Affine(meshstate.nn.Module):
  def __init__(self, n: int) -> None:
    super().__init__()
    self.weight = meshstate.ParamState(jnp.ones((n,)))
    self.steps = meshstate.LongTermState(jnp.zeros((), jnp.int32))

  def __call__(self, delta: jax.Array) -> jax.Array:
    self.weight.value = self.weight.value + delta
    self.steps.value = self.steps.value + 1
    return self.weight.value

  @pmap2(axis_name='i')
  def scaled(self, x: jax.Array) -> jax.Array:
    return x * jax.lax.psum(1.0, 'i')


def pmap2_forms() -> tuple[jax.Array, jax.Array, str]:
  n = jax.local_device_count()
  total = meshstate.State(jnp.zeros(()))

  @pmap2(axis_name='d')
  def step(x: jax.Array) -> jax.Array:
    total.value = total.value + jax.lax.psum(x, 'd')
    return x * 2

  decorated: StatefulMapping = step
  model = Affine(n)
  called: StatefulMapping = pmap2(model, 'devices', state_in_axes=OfType(meshstate.ParamState),
                                  state_out_axes={0: meshstate.ParamState})
  explanation: Explanation = called.explain(jnp.ones((n, 4)))
  lowered = decorated.lower(jax.ShapeDtypeStruct((n,), jnp.float32))
  text: str = lowered.as_text()
  out = lowered.compile()(jnp.ones(n))
  table: StateTable = meshstate.sharding.describe(model)
  name: str = decorated.__name__
  return out, model.scaled(jnp.ones(n)), f'{explanation}{text[:0]}{table}{name}'


def vmap2_forms() -> jax.Array:
  w = meshstate.ParamState(jnp.ones(3))
  called: StatefulMapping = vmap2(lambda x: w.value * x, in_axes=0)

  @vmap2(in_axes=(0, None), state_in_axes=PathContains('w'))
  def add(x: jax.Array, y: float) -> jax.Array:
    return x + y

  decorated: StatefulMapping = add
  return decorated(called(jnp.arange(2.)), 1.0)


def jit_forms() -> jax.Array:
  acc = meshstate.State(jnp.zeros(2))

  @jit
  def add(x: jax.Array) -> None:
    acc.value = acc.value + x

  @jit(static_argnums=1, donate_states=True)
  def scale(x: jax.Array, k: int) -> jax.Array:
    return x * k

  bare: StatefulMapping = add
  configured: StatefulMapping = scale
  called: StatefulMapping = jit(lambda x: x + acc.value)
  bare(jnp.ones(2))
  return called(configured(jnp.ones(2), 3))


def shard_map_forms() -> tuple[jax.Array, jax.Array]:
  mesh = Mesh(np.array(jax.devices()), ('i',))
  n = len(jax.devices())
  w = meshstate.ParamState(jnp.zeros((n, 2)))

  @shard_map(mesh=mesh, in_specs=P('i'), out_specs=P('i'), state_in_specs={w: P('i')})
  def step(x: jax.Array) -> jax.Array:
    w.value = w.value + x
    return x * 2

  decorated: StatefulShardMap = step
  positional: StatefulShardMap = shard_map(lambda x: x + 1, mesh, P('i'), P('i'))
  explanation: Explanation = decorated.explain(jnp.ones((n, 2)))
  assert explanation.check_vma
  return decorated(jnp.ones((n, 2))), positional(jnp.ones(n))


def autodiff_and_loops() -> tuple[Any, Any, jax.Array]:
  w = meshstate.ParamState(jnp.array([1., 2.]))

  @grad(grad_states=w)
  def loss(x: jax.Array) -> jax.Array:
    return jnp.sum(w.value * x) ** 2

  g: Callable[..., Any] = loss
  value, grads = value_and_grad(lambda: jnp.sum(w.value ** 2), grad_states=w)()
  layer = checkpoint(lambda x: jnp.sin(w.value * x))

  @checkpoint(prevent_cse=False)
  def layer2(x: jax.Array) -> jax.Array:
    return jnp.cos(w.value * x)

  ys = for_loop(lambda x: layer(x) + layer2(x), jnp.arange(3.))
  carry, _ = scan(lambda c, x: (c + x, c), 0., jnp.arange(3.))
  return g(jnp.ones(2)), (value, grads, carry), ys


def random_forms() -> jax.Array:
  rs = meshstate.random.RandomState(0)
  meshstate.random.seed(1)
  keys = meshstate.random.split_key(2)
  return rs.normal(size=(2,)) + meshstate.random.uniform(size=2) + keys[0, 0]


EXAMPLES = [pmap2_forms, vmap2_forms, jit_forms, shard_map_forms, autodiff_and_loops,
            random_forms]
