"""Process-local ⇄ global arrays for JAX's multi-controller runtime (several processes).

With `jax.distributed.initialize`, every process runs the same program and addresses only its
own devices. A *global* `jax.Array` spans the devices of all processes; each process holds
only its *local part* (the shards on its own devices). These helpers convert between the two
with JAX's own machinery (`jax.make_array_from_process_local_data` and
`jax.experimental.multihost_utils`); none of them hand-rolls a collective. In a single process
every array is local and global at once: the conversions are then (almost) no-ops, which is
what the examples below show.

Functions that talk to other processes (`gather`, `assert_same_across_processes`) are
collective: every process must call them, in the same order, with values of the same shapes.
"""
from __future__ import annotations

import hashlib
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, Sharding

__all__ = ['global_devices', 'is_global', 'to_global', 'to_local', 'local_value', 'gather',
           'assert_same_across_processes', 'ProcessMismatchError']


class ProcessMismatchError(ValueError):
  """The processes of a multi-process program disagree (on a call signature, for example)."""


def global_devices(backend: str | None = None) -> tuple:
  """Every device of every process, grouped by process (process 0's first), as `jax.pmap` orders.

  A 1-D mesh over these devices gives each process a contiguous block of the mapped axis, so a
  process's local part of a mapped array is one slice of the global one.

  Args:
    backend: the platform whose devices to list (`'cpu'`, `'gpu'`, `'tpu'`); None: the
      default backend.

  Example:
    >>> import jax
    >>> from meshstate.transform._multihost import global_devices
    >>> global_devices() == tuple(jax.devices())
    True
  """
  return tuple(d for p in range(jax.process_count(backend))
               for d in jax.local_devices(process_index=p, backend=backend))


def is_global(x: Any) -> bool:
  """Whether `x` is a `jax.Array` whose shards live in more than this process.

  Such an array is only partly readable here (`to_local`, `gather`). Always False with one
  process, and for tracers, numpy arrays and Python scalars.

  Args:
    x: any value.

  Example:
    >>> import jax.numpy as jnp
    >>> from meshstate.transform._multihost import is_global
    >>> is_global(jnp.ones(3)), is_global(3.0)
    (False, False)
  """
  return (isinstance(x, jax.Array) and not isinstance(x, Tracer)
          and not x.is_fully_addressable)


def _broadcast(prefix: Any, tree: Any, is_leaf) -> list:
  """The leaves of `prefix` (leaves told by `is_leaf`), one per leaf of `tree`."""
  if is_leaf(prefix):
    return [prefix] * len(jax.tree.leaves(tree))
  return jax.tree.leaves(jax.tree.broadcast(prefix, tree, is_leaf=is_leaf), is_leaf=is_leaf)


def _leaf_to_global(x: Any, sharding: Sharding, global_shape: tuple | None) -> jax.Array:
  if is_global(x):
    return x
  if global_shape is None and isinstance(sharding, NamedSharding):
    # Reuses the local buffers when `x` is already laid out on this process's devices.
    return multihost_utils.host_local_array_to_global_array(x, cast(Mesh, sharding.mesh),
                                                            sharding.spec)
  return jax.make_array_from_process_local_data(sharding, np.asarray(x), global_shape)


def to_global(local_value: Any, sharding: Any, global_shape: Any = None) -> Any:
  """One global `jax.Array` per leaf of `local_value`, this process's part of it.

  `sharding` (one `Sharding`, or a pytree prefix of shardings) gives the global layout; along a
  dimension it splits over devices of several processes, each process passes only its slice
  (4 of 8 rows when it holds 4 of 8 devices), and along other dimensions the whole extent
  (the same data in every process). `global_shape` (optional, per leaf) is for layouts where
  that is ambiguous. A leaf that already spans all processes is returned as it is. With one
  process this places the value on the sharding's devices.

  Args:
    local_value: this process's part: an array, or a pytree of arrays.
    sharding: the global layout: one `jax.sharding.Sharding` for every leaf, or a pytree
      prefix of `local_value` made of them.
    global_shape: the global shape of each leaf (a tuple of ints, or a pytree prefix of them);
      None infers it from the sharding.

  Example:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> from meshstate.transform._multihost import to_global, global_devices
    >>> mesh = Mesh(np.array(global_devices()), ('i',))
    >>> local = np.arange(jax.local_device_count(), dtype=np.float32)
    >>> x = to_global(local, NamedSharding(mesh, P('i')))
    >>> x.shape == (jax.device_count(),), x.sharding.spec
    (True, P('i',))
  """
  leaves, treedef = jax.tree.flatten(local_value)
  shardings = _broadcast(sharding, local_value, lambda s: isinstance(s, Sharding))
  shapes = ([None] * len(leaves) if global_shape is None else
            _broadcast(global_shape, local_value,
                       lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)))
  return treedef.unflatten([_leaf_to_global(x, s, g) for x, s, g in zip(leaves, shardings,
                                                                         shapes)])


def _leaf_to_local(x: Any) -> Any:
  if not is_global(x):
    return x
  sharding = x.sharding
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f'to_local needs a NamedSharding to find the local part of an array that '
                    f'spans processes; got an array of shape {x.shape} with {sharding}.')
  return multihost_utils.global_array_to_host_local_array(x, cast(Mesh, sharding.mesh),
                                                          sharding.spec)


def to_local(global_value: Any) -> Any:
  """This process's part of each global leaf of `global_value` (what `jax.pmap` returns here).

  A sharded dimension shrinks to this process's slice (its shards, in mesh order); a replicated
  one keeps its full size. The result is a `jax.Array` on this process's devices; no data moves
  between processes. Leaves that are already local (every leaf, with one process) are returned
  as they are.

  Args:
    global_value: a global array, or a pytree of arrays.

  Example:
    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> from meshstate.transform._multihost import to_local, to_global, global_devices
    >>> mesh = Mesh(np.array(global_devices()), ('i',))
    >>> local = np.ones((jax.local_device_count(), 3), np.float32)
    >>> to_local(to_global(local, NamedSharding(mesh, P('i')))).shape == local.shape
    True
  """
  return jax.tree.map(_leaf_to_local, global_value)


def _values(obj: Any) -> Any:
  from meshstate._state import State
  return jax.tree.map(lambda s: s.value if isinstance(s, State) else s, obj,
                      is_leaf=lambda s: isinstance(s, State))


def local_value(obj: Any) -> Any:
  """A `State`'s value (or a pytree of States and arrays), each array as this process's part.

  A mapped state that spans processes gives this process's lanes; a replicated one its full
  value. Nothing is fetched from other processes.

  Args:
    obj: a `State`, an array, or a pytree of them.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> from meshstate.transform._multihost import local_value
    >>> w = meshstate.ParamState(jnp.arange(3.))
    >>> local_value({'w': w})['w'].tolist()
    [0.0, 1.0, 2.0]
  """
  return to_local(_values(obj))


def _leaf_gather(x: Any) -> np.ndarray:
  if jnp.issubdtype(getattr(x, 'dtype', None) or np.result_type(x), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if is_global(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def gather(obj: Any) -> Any:
  """A `State`'s value (or a pytree of States and arrays) as numpy arrays of the global value.

  An array that spans processes is gathered from all of them (every process must call
  `gather` on the same values, in the same order: it is a collective); a local one is copied
  to the host as it is. Typed PRNG keys come back as their key data.

  Args:
    obj: a `State`, an array, or a pytree of them.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> from meshstate.transform._multihost import gather
    >>> w = meshstate.ParamState(jnp.arange(3.))
    >>> gather(w)
    array([0., 1., 2.], dtype=float32)
  """
  return jax.tree.map(_leaf_gather, _values(obj))


def _digest(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=np.uint32).copy()


def _all_texts(text: str) -> list[str]:
  """Every process's `text` (two fixed-shape gathers: the lengths, then the padded bytes)."""
  data = np.frombuffer(text.encode(), dtype=np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
  sizes = np.asarray(sizes).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [bytes(row[:n]).decode(errors='replace') for row, n in zip(rows, sizes)]


def assert_same_across_processes(description: str, what: str = 'call signature') -> None:
  """Raise `ProcessMismatchError` in every process unless all pass the same `description`.

  Meant for trace time: `description` is a text of what must agree (argument shapes, dtypes,
  static arguments, ...). Only a fixed-size hash of it crosses processes first (through
  `multihost_utils.assert_equal`), so different texts cannot leave a process waiting in a
  collective of another shape; on a mismatch every process gathers all the texts and raises an
  error that lists them. It is a collective: every process must reach it.

  Args:
    description: the text that must be the same in every process.
    what: what it describes, for the error message.

  Example:
    >>> from meshstate.transform._multihost import assert_same_across_processes
    >>> assert_same_across_processes('x: float32[4]')   # one process: always the same
  """
  if jax.process_count() == 1:
    return
  try:
    multihost_utils.assert_equal(_digest(description), f'{what} differs across processes')
  except AssertionError:
    texts = _all_texts(description)
  else:
    return
  me = jax.process_index()
  lines = '\n'.join(f'  process {i}{" (this one)" if i == me else ""}: {t}'
                    for i, t in enumerate(texts))
  raise ProcessMismatchError(
      f'The processes disagree on the {what}; every process must make the same call with '
      f'arguments of the same shapes and the same static arguments:\n{lines}')
