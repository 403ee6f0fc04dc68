"""Every use of a name JAX does not export publicly, checked once at import.

If a JAX release moves one of these, importing meshstate fails here with a message that names
it, instead of a transform silently taking another path.
"""
from __future__ import annotations

from typing import Any

__all__ = ['ArrayImpl', 'vma', 'distributed_client', 'api_boundary', 'hide_frames_of']

try:
  from jax._src.array import ArrayImpl   # the concrete array type: skips tracer checks by type
except ImportError as err:  # pragma: no cover - depends on the installed JAX
  raise ImportError(f'meshstate needs jax._src.array.ArrayImpl, which this JAX release does not '
                    f'have ({err}); install a JAX version that meshstate supports.') from err


try:
  from jax._src import distributed as _distributed   # the coordination service's client
except ImportError as err:  # pragma: no cover - depends on the installed JAX
  raise ImportError(f'meshstate needs jax._src.distributed, which this JAX release does not '
                    f'have ({err}); install a JAX version that meshstate supports.') from err
if not hasattr(_distributed, 'global_state'):  # pragma: no cover
  raise ImportError('meshstate needs jax._src.distributed.global_state, which this JAX '
                    'release does not have; install a JAX version that meshstate supports.')


try:   # how JAX hides its own frames from the tracebacks of errors raised in user code
  from jax._src.traceback_util import api_boundary, register_exclusion
except ImportError as err:  # pragma: no cover - depends on the installed JAX
  raise ImportError(f'meshstate needs jax._src.traceback_util, which this JAX release does not '
                    f'have ({err}); install a JAX version that meshstate supports.') from err


def hide_frames_of(path: str) -> None:
  """Hide frames from files under `path` in tracebacks, as JAX hides its own.

  `JAX_TRACEBACK_FILTERING=off` (JAX's switch) shows them again.
  """
  register_exclusion(path)


def distributed_client() -> Any:
  """The client of `jax.distributed`'s coordination service (None without several processes).

  Its key-value store lets processes agree on a value without a device collective, which
  cannot run while a function is being traced.
  """
  return getattr(_distributed.global_state, 'client', None)


def vma(aval: Any) -> frozenset:
  """The mesh axes an abstract value varies over inside `shard_map(check_vma=True)`.

  The attribute moved between JAX releases (`aval.vma`, then `aval.mat.varying`).
  """
  found = getattr(aval, 'vma', None)
  if found is None:
    found = getattr(getattr(aval, 'mat', None), 'varying', frozenset())
  return frozenset(found)
