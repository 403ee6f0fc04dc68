"""Leaky integrate-and-fire populations, one per device: a `for_loop` of time steps in `pmap2`.

Each device simulates one population of LIF neurons. Every neuron gets its population's constant
drive, Gaussian noise (drawn from `meshstate.random`, a different key on every device) and
excitation from the neurons of its population that spiked on the previous step, through a
sparse weight matrix shared by all populations. The membrane potentials and last spikes are
`HiddenState`s mapped over the devices; the time loop runs on the device with a progress bar.

  python docs/examples/lif_network.py [--steps 2000] [--neurons 200]

Runs on every device JAX finds; with no accelerator, on 8 simulated CPU devices.
"""
from __future__ import annotations

import argparse

import jax

jax.config.update('jax_num_cpu_devices', 8)   # before any backend starts; CPU only

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import meshstate  # noqa: E402
from meshstate.transform import ProgressBar, for_loop, pmap2  # noqa: E402


class LIFPopulations(meshstate.nn.Module):
  """`n_pop` populations of `n` LIF neurons (time in ms)."""

  def __init__(self, n_pop: int, n: int, dt: float = 0.1, tau: float = 10., v_th: float = 1.,
               v_reset: float = 0., noise: float = 0.5, seed: int = 0):
    super().__init__()
    rng = np.random.RandomState(seed)
    connected = rng.uniform(size=(n, n)) < 0.1
    self.w = meshstate.ParamState(jnp.asarray(connected * 0.02, jnp.float32))
    self.v = meshstate.HiddenState(jnp.zeros((n_pop, n)))
    self.spike = meshstate.HiddenState(jnp.zeros((n_pop, n)))
    self.dt, self.tau, self.v_th, self.v_reset, self.noise = dt, tau, v_th, v_reset, noise

  def step(self, drive):
    """One time step of one population (inside the mapped body): its number of spikes."""
    v = self.v.value
    recurrent = self.spike.value @ self.w.value
    noise = self.noise * jnp.sqrt(self.dt / self.tau) * meshstate.random.normal(size=v.shape)
    v = v + self.dt / self.tau * (drive - v) + recurrent + noise
    fired = v >= self.v_th
    self.v.value = jnp.where(fired, self.v_reset, v)
    self.spike.value = fired.astype(jnp.float32)
    return fired.sum()


def main(steps: int, neurons: int) -> None:
  n_pop = jax.device_count()
  net = LIFPopulations(n_pop, neurons)
  drives = jnp.linspace(0.9, 1.6, n_pop)   # one constant drive per population
  meshstate.random.seed(0)
  per_device = [net.v, net.spike]

  @pmap2(axis_name='pop', state_in_axes={0: per_device}, state_out_axes={0: per_device})
  def simulate(drive):
    bar = ProgressBar(count=10, desc=f'{steps} steps of {neurons} neurons x {n_pop} populations')
    return for_loop(lambda t: net.step(drive), jnp.arange(steps), pbar=bar)

  counts = np.asarray(simulate(drives))   # (populations, steps): spikes per time step
  jax.effects_barrier()                   # let the progress bar finish before printing
  seconds = steps * net.dt / 1000
  bins = counts.reshape(n_pop, 10, -1).sum(-1) if steps % 10 == 0 else None
  print(f'{n_pop} populations of {neurons} LIF neurons, {steps} steps of {net.dt} ms')
  for p in range(n_pop):
    total = int(counts[p].sum())
    rate = total / neurons / seconds
    shape = '' if bins is None else '  ' + ' '.join(f'{int(b):4d}' for b in bins[p])
    print(f'population {p}: drive {float(drives[p]):.2f}  spikes {total:6d}  '
          f'rate {rate:6.1f} Hz{shape}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--neurons', type=int, default=200)
  args = parser.parse_args()
  main(args.steps, args.neurons)
