"""Every use of a name JAX does not export publicly, checked once at import.

If a JAX release moves one of these, importing meshstate fails here with a message that names
it, instead of a transform silently taking another path.
"""
from __future__ import annotations

from typing import Any

__all__ = ['ArrayImpl', 'vma']

try:
  from jax._src.array import ArrayImpl   # the concrete array type: skips tracer checks by type
except ImportError as err:  # pragma: no cover - depends on the installed JAX
  raise ImportError(f'meshstate needs jax._src.array.ArrayImpl, which this JAX release does not '
                    f'have ({err}); install a JAX version that meshstate supports.') from err


def vma(aval: Any) -> frozenset:
  """The mesh axes an abstract value varies over inside `shard_map(check_vma=True)`.

  The attribute moved between JAX releases (`aval.vma`, then `aval.mat.varying`).
  """
  found = getattr(aval, 'vma', None)
  if found is None:
    found = getattr(getattr(aval, 'mat', None), 'varying', frozenset())
  return frozenset(found)
