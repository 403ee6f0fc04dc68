"""meshstate: a state-aware parallel map for JAX, built on `Mesh` + `shard_map` under `jit`.

Example:
  >>> import jax.numpy as jnp, meshstate
  >>> w = meshstate.ParamState(jnp.zeros(2))
  >>> f = meshstate.transform.vmap2(lambda x: w.value + x, in_axes=0)
  >>> f(jnp.ones((3, 2))).shape
  (3, 2)
"""
from meshstate._state import (State, ParamState, ShortTermState, LongTermState, HiddenState,
                              StateTraceError)
from meshstate._errors import BatchAxisError
from meshstate import random, nn, util, transform, sharding, multihost, graph

__version__ = '0.1.0'

__all__ = ['State', 'ParamState', 'ShortTermState', 'LongTermState', 'HiddenState',
           'StateTraceError', 'BatchAxisError', 'random', 'nn', 'util', 'transform', 'sharding',
           'multihost', 'graph']
