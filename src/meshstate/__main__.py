"""``python -m meshstate``: a short demo on 8 simulated CPU devices, no accelerator needed."""
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


def _section(title: str) -> None:
  print(f'\n== {title} ' + '=' * max(0, 74 - len(title)))


def main(argv: list[str] | None = None) -> int:
  """Run the tutorial's examples (docs/parallelisation.ipynb) and show how the states lie."""
  _simulate_cpu_devices()

  import jax
  import jax.numpy as jnp
  import meshstate
  from meshstate.transform import StatefulMapping, pmap2
  from meshstate.util.filter import OfType

  n = jax.local_device_count()
  print(f'JAX {jax.__version__}, backend {jax.default_backend()!r}, local device count: {n}')

  class Affine(meshstate.nn.Module):
    def __init__(self, size):
      super().__init__()
      self.weight = meshstate.ParamState(jnp.ones((size,)))

    def __call__(self, delta):
      self.weight.value = self.weight.value + delta
      return self.weight.value

  params = OfType(meshstate.ParamState)
  _section('1. pmap2 over every device: a per-device delta updates a sharded weight')
  model = Affine(n)
  update = pmap2(model, axis_name='devices', state_in_axes={0: params},
                 state_out_axes={0: params})
  updated = update(jnp.arange(n * 4.).reshape(n, 4))
  print('updated shape:', updated.shape)
  print('final weights:\n', model.weight.value)

  _section('layout of the model after the call (meshstate.sharding.describe)')
  print(meshstate.sharding.describe(model))
  _section('what pmap2 hands to shard_map for that call (StatefulMapping.explain)')
  print(update.explain(jnp.zeros((n, 4))))

  if n >= 2:
    _section('2. devices=: a smaller logical mesh of two devices')
    pair = Affine(2)
    pmap2(pair, axis_name='pair', devices=jax.devices()[:2], state_in_axes={0: params},
          state_out_axes={0: params})(jnp.stack([jnp.ones(4), -jnp.ones(4)]))
    print('weights after pairwise update:\n', pair.weight.value)

  _section('3. an unmapped argument (in_axes=(0, None))')
  add = pmap2(lambda delta, scale: delta + scale, axis_name='devices', in_axes=(0, None))
  print(add(jnp.arange(n), 0.5))

  _section('4. random numbers: one stream per device, the global key advances once')
  meshstate.random.seed(0)
  sample = pmap2(lambda scale: meshstate.random.normal(0.0, scale), axis_name='devices')
  print(sample(jnp.linspace(1.0, 2.0, n)))
  shared = pmap2(lambda key, scale: jax.random.normal(key, ()) * scale, axis_name='devices',
                 in_axes=(None, 0))
  print('same key on every device:', shared(jax.random.PRNGKey(0), jnp.linspace(1.0, 2.0, n)))

  _section('5. StatefulMapping with a custom mapping_fn (jax.pmap, donating delta)')
  model = Affine(n)
  custom = StatefulMapping(model, state_in_axes={0: params}, state_out_axes={0: params},
                           axis_name='devices',
                           mapping_fn=lambda f, *a, **kw: jax.pmap(f, *a, donate_argnums=(0,),
                                                                   **kw))
  custom(jnp.ones((n, 4)))
  print(type(custom).__name__, 'weights:\n', model.weight.value)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
