"""`import meshstate` must leave JAX's backends alone (the notebook sets the device count after)."""
import os
import subprocess
import sys
import textwrap

import meshstate

SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(meshstate.__file__)))


def _run_clean(code: str) -> subprocess.CompletedProcess:
  env = {'PYTHONPATH': SRC_DIR}  # nothing else: no XLA_FLAGS, no JAX_PLATFORMS
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, timeout=300)


def test_import_then_set_cpu_device_count():
  proc = _run_clean("""
      import meshstate
      import jax
      from jax._src import xla_bridge
      assert not xla_bridge.backends_are_initialized(), 'import meshstate initialised a backend'
      jax.config.update('jax_num_cpu_devices', 8)
      n = len(jax.devices('cpu'))
      assert n == 8, n
      assert len(jax.devices()) == 8 or jax.default_backend() != 'cpu', jax.devices()
      print('OK', n, meshstate.__version__)
      """)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ['OK', '8', '0.1.0']


def test_import_exposes_public_names():
  proc = _run_clean("""
      import meshstate
      from meshstate.util.filter import OfType, Any, All, Not, Everything, Nothing, PathContains
      from meshstate.nn import Module
      for name in ['State', 'ParamState', 'ShortTermState', 'LongTermState', 'HiddenState',
                   'BatchAxisError', 'StateTraceError', 'random', 'nn', 'util', 'transform',
                   'sharding']:
        getattr(meshstate, name)
      print('OK')
      """)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == 'OK'


def test_demo_runs_on_simulated_cpu_devices():
  env = {'PYTHONPATH': SRC_DIR, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-m', 'meshstate'], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert 'local device count: 8' in out, out
  assert 'updated shape: (8, 4)' in out and 'weights after pairwise update' in out
  header = [line for line in out.splitlines() if line.startswith('path ')]
  assert header and all(c in header[0] for c in ('spec', 'mesh_axes', 'bytes_per_device'))
  assert "weight  ParamState  (8,4)  float32  P('devices')" in out
  # it explains what it prints: a legend for every column, the shape change, the docs
  legend = out[out.index('(columns:'):]
  assert all(f'{c} =' in legend for c in header[0].split())
  assert 'weight before: shape (8,)' in out and 'weight after:  shape (8, 4)' in out
  assert 'docs/parallelisation.ipynb' in out
  same = out[out.index('the same draw:'):].split(':', 1)[1].split('\n\n')[0]
  assert len(set(same.replace('[', ' ').replace(']', ' ').split())) == 1
