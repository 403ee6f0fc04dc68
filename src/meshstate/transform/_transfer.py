"""Moving values onto the shardings a program reads them on, in one batched transfer."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshstate._compat import ArrayImpl

__all__ = ['put']

# Up to this size a one-device array bound for several accelerators goes through host memory:
# two copies of at most ~0.1 ms each, against a slicing program compiled per shape the first
# time (~0.1 s) and an on-device slice later (a state replaced every step by a large array
# keeps that). On the CPU backend host memory is device memory: every size goes through it.
_VIA_HOST_BYTES = 1 << 20


def put(values: Sequence[Any], shardings: Sequence[Any]) -> list:
  """`jax.device_put(values, shardings)`, small one-device arrays split through the host.

  JAX splits an array held by one device with a slicing program it compiles per shape and
  dtype: a first call over states of many shapes (a model's parameters) paid a compile per
  shape, 0.1-0.2 s each on CPU devices. Copying through the host takes microseconds.
  """
  return jax.device_put([jax.tree.map(_source, v, s) for v, s in zip(values, shardings)],
                        list(shardings))


def _source(x: Any, where: Any) -> Any:
  if (type(x) is not ArrayImpl or where.is_fully_replicated or not where.is_fully_addressable
      or len(x.sharding.device_set) != 1 or x.weak_type   # a numpy copy would lose weak typing
      or jnp.issubdtype(x.dtype, jax.dtypes.extended)):   # typed keys: no numpy form
    return x
  if x.nbytes > _VIA_HOST_BYTES and next(iter(x.devices())).platform != 'cpu':
    return x
  return np.asarray(x)
