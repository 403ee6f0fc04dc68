"""Programs on several processes (`jax.distributed`): process-local parts and global arrays.

With several processes, `pmap2` maps over the devices of all of them: each process passes its
part of the inputs and gets its part of the outputs back, while states hold arrays that span
every process. Read a state's part with `local_value`, or the whole of it with `gather`.

Example:
  >>> import jax.numpy as jnp, meshstate
  >>> from meshstate.multihost import gather, local_value
  >>> s = meshstate.State(jnp.arange(3.))
  >>> local_value(s).tolist(), gather(s).tolist()
  ([0.0, 1.0, 2.0], [0.0, 1.0, 2.0])
"""
from meshstate.transform._multihost import (ProcessMismatchError, assert_same_across_processes,
                                            gather, global_devices, is_global, local_value,
                                            to_global, to_local)

__all__ = ['global_devices', 'is_global', 'to_global', 'to_local', 'local_value', 'gather',
           'assert_same_across_processes', 'ProcessMismatchError']
