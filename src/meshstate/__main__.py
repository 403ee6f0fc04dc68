"""``python -m meshstate``: a short demo on 8 simulated CPU devices, no accelerator needed."""
import os
import sys
import textwrap

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


_LEGEND = ("(columns: path = where the state lives in the module; type = its State class; "
           "shape and dtype = the global value; spec = its PartitionSpec; mesh_axes = which "
           "dimension is split over which mesh axis; shard_shape = the block one device holds; "
           "bytes_per_device = what that block costs; replicated = whether every device holds "
           "the whole value)")


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
  print('The tutorial this follows: docs/parallelisation.ipynb; moving from jax.pmap to '
        'shard_map: docs/migration.md.')

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
  print(f'weight before: shape {model.weight.value.shape}, one scalar per device')
  updated = update(jnp.arange(n * 4.).reshape(n, 4))
  print(f'weight after:  shape {model.weight.value.shape}: each device added its (4,) delta to '
        f'its scalar, so its part is now (4,), stacked over the {n} devices')
  print('updated shape:', updated.shape)
  print('final weights:\n', model.weight.value)

  _section('layout of the model after the call (meshstate.sharding.describe)')
  print(meshstate.sharding.describe(model))
  print(textwrap.fill(_LEGEND, 98))
  _section('what pmap2 hands to shard_map for that call (StatefulMapping.explain)')
  print(update.explain(jnp.zeros((n, 4))))
  print('(in_specs/out_specs: how each argument, output and state is split over the mesh; the '
        'program shown is the one the call runs, and .run() executes it)')

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
  print('(each device draws from its own key, scaled by its own scale)')
  shared = pmap2(lambda key, scale: jax.random.normal(key, ()) * scale, axis_name='devices',
                 in_axes=(None, 0))
  print('one key passed to every device (in_axes=None), scale 1 everywhere: the same draw:',
        shared(jax.random.PRNGKey(0), jnp.ones(n)))

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
