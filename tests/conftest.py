"""Run every test on the CPU backend with 8 simulated devices.

This must happen before any JAX backend initialises, so it is done at import time of this
conftest, which pytest (and each pytest-xdist worker) loads before the test modules.
"""
import os

_DEVICE_FLAG = '--xla_force_host_platform_device_count=8'

os.environ['JAX_PLATFORMS'] = 'cpu'
_flags = os.environ.get('XLA_FLAGS', '')
if _DEVICE_FLAG not in _flags.split():
  os.environ['XLA_FLAGS'] = f'{_flags} {_DEVICE_FLAG}'.strip()

import jax  # noqa: E402  (after the environment is set)

jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 8)

# MESHSTATE_VMAP_ORACLE=<file>: check discovery against jax.vmap; counts are appended to <file>.
if os.environ.get('MESHSTATE_VMAP_ORACLE'):
  import atexit

  import vmap_oracle

  vmap_oracle.install()
  def _report():
    with open(os.environ['MESHSTATE_VMAP_ORACLE'], 'a') as f:
      f.write(f'{vmap_oracle.checked}\n')
  atexit.register(_report)
