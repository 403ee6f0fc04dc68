"""Data-parallel training of a small MLP with optax: a `pmap2` step per batch, an epoch per `jit`.

Every device gets its slice of each batch; the gradients (`meshstate.transform.grad` with respect
to the model's `ParamState`s) are averaged with `lax.pmean`, so the parameters and the optax
state stay replicated. One epoch is a `for_loop` over the batches, compiled as one program.
The data (a noisy 2-D regression problem) is generated here.

  python docs/examples/train_mlp.py [--epochs 30]

Runs on every device JAX finds; with no accelerator, on 8 simulated CPU devices.
"""
from __future__ import annotations

import argparse

import jax

jax.config.update('jax_num_cpu_devices', 8)   # before any backend starts; CPU only

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshstate  # noqa: E402
from meshstate.transform import for_loop, grad, jit, pmap2  # noqa: E402


class MLP(meshstate.nn.Module):
  """`sizes[0]` inputs → tanh hidden layers → `sizes[-1]` outputs."""

  def __init__(self, sizes: list[int], seed: int = 0):
    super().__init__()
    rng = np.random.RandomState(seed)
    self.weights = [meshstate.ParamState(jnp.asarray(
        rng.standard_normal((m, n)).astype(np.float32) / np.sqrt(m)))
        for m, n in zip(sizes[:-1], sizes[1:])]
    self.biases = [meshstate.ParamState(jnp.zeros(n)) for n in sizes[1:]]

  def __call__(self, x):
    for i, (w, b) in enumerate(zip(self.weights, self.biases)):
      x = x @ w.value + b.value
      if i < len(self.weights) - 1:
        x = jnp.tanh(x)
    return x


def make_data(n_batches: int, n_devices: int, per_device: int, seed: int = 1):
  """Batches `(n_batches, n_devices, per_device, 2)` of inputs and their noisy targets."""
  rng = np.random.RandomState(seed)
  x = rng.uniform(-1, 1, (n_batches, n_devices, per_device, 2)).astype(np.float32)
  y = np.sin(3 * x[..., :1]) * np.cos(2 * x[..., 1:])
  y = y + 0.05 * rng.standard_normal(y.shape).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y)


def main(epochs: int) -> None:
  n = jax.device_count()
  model = MLP([2, 32, 32, 1])
  params = {'/'.join(map(str, path)): s for path, s in model.states(meshstate.ParamState).items()}
  optimizer = optax.adam(1e-2)
  opt_state = meshstate.State(optimizer.init({k: s.value for k, s in params.items()}))

  @pmap2(axis_name='devices')
  def train_step(x, y):
    def loss():
      return jnp.mean((model(x) - y) ** 2)

    grads, value = grad(loss, grad_states=params, return_value=True)()
    grads = jax.lax.pmean(grads, 'devices')          # the data-parallel average
    values = {k: s.value for k, s in params.items()}
    updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
    for k, new in optax.apply_updates(values, updates).items():
      params[k].value = new
    return jax.lax.pmean(value, 'devices')

  @jit
  def epoch(xs, ys):   # all batches of one epoch: one compiled program
    return for_loop(train_step, xs, ys)

  xs, ys = make_data(n_batches=16, n_devices=n, per_device=32)
  print(f'{n} devices, {xs.shape[0]} batches of {n} x {xs.shape[2]} examples per epoch')
  for e in range(1, epochs + 1):
    losses = epoch(xs, ys)           # (batches, devices): the same mean loss on every device
    print(f'epoch {e:3d}  loss {float(losses[:, 0].mean()):.5f}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=30)
  main(parser.parse_args().epochs)
