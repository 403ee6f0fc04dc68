"""meshstate: a state-aware parallel map for JAX, built on `Mesh` + `shard_map` under `jit`.

Example:
  >>> import jax.numpy as jnp, meshstate
  >>> w = meshstate.ParamState(jnp.zeros(2))
  >>> f = meshstate.transform.vmap2(lambda x: w.value + x, in_axes=0)
  >>> f(jnp.ones((3, 2))).shape
  (3, 2)
"""
import os as _os

from meshstate._compat import hide_frames_of as _hide_frames_of
from meshstate._state import (State, ParamState, ShortTermState, LongTermState, HiddenState,
                              StateTraceError)
from meshstate._errors import BatchAxisError
from meshstate import random, nn, util, transform, sharding, multihost, graph

# Errors raised in user code show the user's frames, not meshstate's (JAX_TRACEBACK_FILTERING=off
# shows them all).
_hide_frames_of(_os.path.dirname(__file__))

__version__ = '0.1.0'

__all__ = ['State', 'ParamState', 'ShortTermState', 'LongTermState', 'HiddenState',
           'StateTraceError', 'BatchAxisError', 'random', 'nn', 'util', 'transform', 'sharding',
           'multihost', 'graph']
