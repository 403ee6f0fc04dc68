"""`meshstate._compat`: the one home of JAX-private names, which checks itself at import."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import meshstate
from meshstate import _compat

SRC = pathlib.Path(meshstate.__file__).resolve().parent


def test_no_module_but_compat_names_jax_private_modules():
  private = re.compile(r'jax\._src|jax\.interpreters|jax\.core\.(?!Tracer\b)\w+')
  offenders = [f'{path.relative_to(SRC)}:{n}: {line.strip()}'
               for path in SRC.rglob('*.py') if path.name != '_compat.py'
               for n, line in enumerate(path.read_text().splitlines(), 1)
               if private.search(line)]
  assert offenders == []


def _import_with(prelude: str) -> subprocess.CompletedProcess:
  code = textwrap.dedent(prelude) + '\nimport meshstate\n'
  env = {**os.environ, 'PYTHONPATH': str(SRC.parent), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize('prelude, named', [
    ('import jax._src.core as c; del c.get_axis_env', 'jax._src.core.get_axis_env'),
    ('import jax._src.core as c; del c.ShapedArray.mat', 'ShapedArray.mat.varying'),
    ('import jax._src.interpreters.batching as b; del b.BatchTracer',
     'jax._src.interpreters.batching.BatchTracer'),
])
def test_import_fails_loudly_naming_a_moved_private_name(prelude, named):
  proc = _import_with(prelude)
  assert proc.returncode != 0
  assert 'ImportError' in proc.stderr and named in proc.stderr, proc.stderr
  assert f'jax {jax.__version__} does not have' in proc.stderr


def test_import_refuses_a_jax_older_than_the_lower_bound():
  proc = _import_with("import jax; jax.__version__ = '0.9.2'")
  assert proc.returncode != 0
  assert f'meshstate needs jax>={_compat.MIN_JAX}, but jax 0.9.2 is installed' in proc.stderr


def test_vma_names_the_axes_a_value_varies_over():
  mesh = Mesh(np.array(jax.devices()), ('i',))   # Auto axes: shard_map places the inputs
  seen = {}

  def body(sharded, replicated):
    seen['sharded'] = _compat.vma(jax.typeof(sharded))
    seen['replicated'] = _compat.vma(jax.typeof(replicated))
    seen['summed'] = _compat.vma(jax.typeof(lax.psum(sharded, 'i')))
    return sharded
  n = jax.device_count()
  jax.shard_map(body, mesh=mesh, in_specs=(P('i'), P()), out_specs=P('i'), check_vma=True)(
      jnp.arange(n * 2.0), jnp.ones(2))
  assert seen == {'sharded': {'i'}, 'replicated': frozenset(), 'summed': frozenset()}
  assert _compat.vma(jax.typeof(jnp.ones(2))) == frozenset()


def test_bound_axis_names_are_those_of_the_enclosing_maps():
  mesh = Mesh(np.array(jax.devices()), ('i',))   # Auto axes: shard_map places the inputs
  seen = []

  def body(x):
    seen.append(set(_compat.bound_axis_names()))
    return jax.vmap(lambda v: seen.append(set(_compat.bound_axis_names())) or v,
                    axis_name='lane')(x)
  n = jax.device_count()
  jax.shard_map(body, mesh=mesh, in_specs=P('i'), out_specs=P('i'))(jnp.ones((n, 2)))
  assert seen == [{'i'}, {'i', 'lane'}]
  assert _compat.bound_axis_names() == ()


def test_tracer_kind_names_the_transform_that_made_the_tracer():
  kinds = []
  record = lambda x: kinds.append(_compat.tracer_kind(x)) or x  # noqa: E731
  jax.vmap(record)(jnp.ones(2))
  jax.jit(record)(1.0)
  jax.jvp(record, (1.0,), (1.0,))
  jax.linearize(record, 1.0)
  record(np.float32(1.0))
  assert kinds == ['BatchTracer', 'DynamicJaxprTracer', 'JVPTracer', 'LinearizeTracer', '']


def test_scan_counts_reads_consts_and_carries_of_a_scan_equation():
  def f(c, a, b, xs):
    return lax.scan(lambda carry, x: ((carry[0] + c, carry[1] * c), x * c), (a, b), xs)
  jaxpr = jax.make_jaxpr(f)(1.0, 2.0, 3.0, jnp.ones(4))
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
  assert _compat.scan_counts(eqn.params) == (1, 2)
  with pytest.raises(NotImplementedError, match="scan parameters \\(\\['length'\\]\\)"):
    _compat.scan_counts({'length': 4})


def test_the_jaxpr_parameters_read_outside_compat_mean_what_varying_axes_assumes():
  # transform/_varying.py reads equation parameters that JAX's jaxpr documentation names
  # (`axes`, `axis_name`, `axis_index_groups`, `branches`, while's and scan's jaxprs), so they
  # stay there; this pins their meaning on each tested JAX (tox): a renamed one fails here,
  # where grouped reductions would otherwise pass for full ones.
  from meshstate.transform._varying import varying_axes

  def f(x, p):
    full = lax.psum(x, 'i')
    grouped = lax.psum(x, 'i', axis_index_groups=[[0, 1], [2, 3]])
    index = lax.axis_index('i').astype(x.dtype)
    picked = lax.cond(p, lambda v: v, lambda v: v * index, full)
    loop = lax.while_loop(lambda c: c[0] < index, lambda c: (c[0] + 1.0, c[1] + full), (0.0, 0.0))
    scanned = lax.scan(lambda c, _: (c + index, None), full, None, length=2)[0]
    return full, grouped, index, picked, loop[1], scanned

  jaxpr = jax.make_jaxpr(f, axis_env=[('i', 4)])(1.0, True)
  i, none = frozenset({'i'}), frozenset()
  got = varying_axes(jaxpr, [i, none], i)
  assert got == [none, i, i, i, i, i]
  # A replicated input: the index varies, and a grouped reduction is taken to (it may differ).
  got = varying_axes(jaxpr, [none, none], i)
  assert got == [none, i, i, i, i, i]
