"""Cross-check of discovery: the jaxpr-based varying analysis against `jax.vmap`'s batching.

Enabled for a whole test run with `MESHSTATE_VMAP_ORACLE=1` (see conftest.py). Every probe that
`pmap2`/`vmap2` discovery traces on one axis is traced a second time under `jax.vmap`, and each
output the jaxpr analysis calls "the same on every lane" must be unbatched there (and the other
way round). Probes that `jax.vmap` cannot trace (grouped collectives, partial permutations) are
counted and skipped. The probes run with placeholders for states (the two-trace path): vmap
cannot batch the lifted reads of the one-trace path, which have no operand. This reads a
`jax._src` type, which is why it lives in the tests only.
"""
import jax

from meshstate.transform import _mappers, _mesh
from meshstate.transform._varying import varying_axes

checked = {'agree': 0, 'skipped': 0}
_original = _mappers.trace_mapped


def _batched(x, name):
  from jax._src.interpreters import batching
  if not isinstance(x, batching.BatchTracer) or not isinstance(x.batch_dim, int):
    return False
  return getattr(getattr(x._trace, 'axis_data', None), 'name', name) == name


def _checked_trace(probe, slots, layout):
  traced = _original(probe, slots, layout)
  name = layout.name
  by_jaxpr = [name in axes for axes in varying_axes(traced.jaxpr, traced.in_axes,
                                                    traced.tracked)]
  by_vmap = []

  def batched_probe(*lanes):
    by_vmap.extend(_batched(x, name) for x in jax.tree.leaves(probe(*lanes)))
    return 0

  try:
    jax.eval_shape(jax.vmap(batched_probe, in_axes=tuple(layout.slot_axes), out_axes=None,
                            axis_name=name, axis_size=layout.size), *slots)
  except Exception:   # what vmap cannot trace is what the jaxpr route is for
    checked['skipped'] += 1
    return _original(probe, slots, layout)   # the probe's records, from a clean trace
  if by_vmap != by_jaxpr:
    raise AssertionError(f'discovery disagrees with vmap: jaxpr says {by_jaxpr}, vmap '
                         f'{by_vmap}, for {traced.jaxpr}')
  checked['agree'] += 1
  return traced


def install():
  _mappers.Mapper.lifts = _mesh._ShardMapMapper.lifts = lambda self, layout: False
  _mappers.trace_mapped = _checked_trace
  _mesh.trace_mapped = _checked_trace
