"""Every public docstring example runs and prints what it says (8 simulated CPU devices)."""
import doctest
import importlib

import pytest

MODULES = ['meshstate', 'meshstate._state', 'meshstate.random', 'meshstate.nn._module',
           'meshstate.util.filter', 'meshstate.sharding', 'meshstate.transform._engine',
           'meshstate.transform._map', 'meshstate.transform._jit',
           'meshstate.transform._shard_map', 'meshstate.transform._loops',
           'meshstate.transform._autodiff', 'meshstate.transform._progress',
           'meshstate.transform._multihost', 'meshstate.multihost',
           'meshstate.graph']


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0


def test_public_callables_have_an_example():
  import meshstate
  public = [meshstate.transform.pmap2, meshstate.transform.vmap2, meshstate.transform.jit,
            meshstate.transform.shard_map, meshstate.transform.StatefulMapping,
            meshstate.transform.StatefulMapping.explain, meshstate.transform.StatefulMapping.lower,
            meshstate.sharding.describe, meshstate.State, meshstate.random.normal,
            meshstate.random.seed, meshstate.nn.Module, meshstate.transform.grad,
            meshstate.transform.value_and_grad, meshstate.transform.vjp, meshstate.transform.jacrev,
            meshstate.transform.jacfwd, meshstate.transform.for_loop, meshstate.transform.scan,
            meshstate.transform.while_loop, meshstate.transform.cond, meshstate.transform.switch,
            meshstate.transform.checkpoint, meshstate.transform.ProgressBar,
            meshstate.sharding.visualize, meshstate.graph.state, meshstate.graph.update,
            meshstate.graph.split, meshstate.graph.merge, meshstate.graph.abstract]
  missing = [f.__qualname__ for f in public if '>>>' not in (f.__doc__ or '')]
  assert not missing
