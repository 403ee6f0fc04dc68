"""``python -m meshstate``: a short demo that runs on 8 simulated CPU devices without an accelerator."""
import os
import sys

_DEVICE_FLAG = '--xla_force_host_platform_device_count'


def _simulate_cpu_devices(count: int = 8) -> None:
  """Ask for ``count`` CPU devices unless the user chose a device setup already.

  Both settings only affect the CPU backend, so they are harmless when an accelerator is present
  (it stays the default backend). They must be in place before a JAX backend initialises.
  """
  if 'JAX_NUM_CPU_DEVICES' in os.environ or _DEVICE_FLAG in os.environ.get('XLA_FLAGS', ''):
    return
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}={count}".strip()
  import jax
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # a backend is already up (main() called from a live session): keep it
    pass


def main(argv: list[str] | None = None) -> int:
  _simulate_cpu_devices()

  import jax
  import jax.numpy as jnp
  import meshstate

  devices = jax.devices()
  print(f'JAX {jax.__version__}, backend {jax.default_backend()!r}, {len(devices)} devices:')
  print(' ', devices)

  class Affine(meshstate.nn.Module):
    def __init__(self, n_in: int, n_out: int):
      super().__init__()
      self.weight = meshstate.ParamState(jnp.ones((n_in, n_out)))
      self.activity = meshstate.ShortTermState(jnp.zeros((n_out,)))

    def __call__(self, x):
      self.activity.value = x @ self.weight.value
      return self.activity.value

  model = Affine(len(devices), 4)
  print()
  print(model)
  for path, state in model.states().items():
    print(f'  {".".join(map(str, path))}: {type(state).__name__} {state.value.shape}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
