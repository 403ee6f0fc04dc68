"""Every use of a name JAX does not export publicly, checked once at import.

Each name below is the same in every supported JAX release (`MIN_JAX`, the lower bound in
pyproject.toml, up to the newest one tested, 0.12.0.1). If a JAX release moves one of them,
importing meshstate fails here with a message that names it, instead of a transform silently
taking another path.
"""
from __future__ import annotations

import importlib
import operator
import re
from types import ModuleType
from typing import Any

import jax

__all__ = ['MIN_JAX', 'ArrayImpl', 'array_sharding', 'ShapedArray', 'vma', 'bound_axis_names',
           'tracer_kind', 'scan_counts', 'current_trace', 'at_trace', 'distributed_client',
           'api_boundary', 'filter_traceback', 'drop_own_frame', 'hide_frames_of',
           'context_mesh']

# The oldest JAX that has every public API meshstate uses (`jax.extend.core.
# get_opaque_trace_state` is the newest of them); pyproject.toml declares the same bound.
MIN_JAX = '0.10.0'


def _release(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in re.findall(r'\d+', version.split('+')[0])[:3])


if _release(jax.__version__) < _release(MIN_JAX):  # pragma: no cover - depends on the install
  raise ImportError(f'meshstate needs jax>={MIN_JAX}, but jax {jax.__version__} is installed; '
                    f'upgrade it with `pip install -U "jax>={MIN_JAX}"`.')


def _private(module: str, *names: str) -> ModuleType:
  """JAX's private `module`, checked to have `names`; an ImportError naming what is missing."""
  try:
    found = importlib.import_module(module)
  except ImportError as err:  # pragma: no cover - depends on the installed JAX
    raise ImportError(f'meshstate needs {module}, which jax {jax.__version__} does not have '
                      f'({err}); install a JAX version that meshstate supports.') from err
  missing = [name for name in names if not hasattr(found, name)]
  if missing:  # pragma: no cover - depends on the installed JAX
    raise ImportError(f'meshstate needs {", ".join(f"{module}.{n}" for n in missing)}, which '
                      f'jax {jax.__version__} does not have; install a JAX version that '
                      f'meshstate supports.')
  return found


ArrayImpl = _private('jax._src.array', 'ArrayImpl').ArrayImpl   # skips tracer checks by type
# An array's sharding without its Python property (4x faster; the hot path reads one per state).
array_sharding = operator.attrgetter('_sharding' if hasattr(ArrayImpl, '_sharding') else
                                     'sharding')
_distributed = _private('jax._src.distributed', 'global_state')   # the coordination service
_mesh = _private('jax._src.mesh', 'get_concrete_mesh')   # jax.sharding.get_mesh, also in a trace
_traceback = _private('jax._src.traceback_util', 'api_boundary', 'register_exclusion')
api_boundary = _traceback.api_boundary
_core = _private('jax._src.core', 'ShapedArray', 'ManualAxisType', 'AxisEnv', 'get_axis_env',
                 'trace_ctx', 'set_current_trace')
# The varying mesh axes of a value inside shard_map(check_vma=True): `aval.mat.varying`.
if not (isinstance(getattr(_core.ShapedArray, 'mat', None), property)
        and hasattr(_core.ManualAxisType, 'varying')
        and callable(getattr(_core.AxisEnv, 'axis_names', None))):  # pragma: no cover
  raise ImportError(f'meshstate needs jax._src.core.ShapedArray.mat.varying and '
                    f'AxisEnv.axis_names, which jax {jax.__version__} does not have; install a '
                    f'JAX version that meshstate supports.')
ShapedArray = _core.ShapedArray   # the abstract value of an array, for a primitive's result


def current_trace() -> Any:
  """The JAX trace that operations bind to now (the innermost one being traced)."""
  return _core.trace_ctx.trace


def at_trace(trace: Any) -> Any:
  """A context in which operations bind to `trace`, an enclosing trace of the current one."""
  return _core.set_current_trace(trace)

# The tracers each raw JAX transform makes, for advice on which meshstate transform to use.
_TRACERS = (
    (_private('jax._src.interpreters.batching', 'BatchTracer').BatchTracer, 'BatchTracer'),
    (_private('jax._src.interpreters.ad', 'JVPTracer').JVPTracer, 'JVPTracer'),
    (_private('jax._src.interpreters.ad', 'LinearizeTracer').LinearizeTracer, 'LinearizeTracer'),
    (_private('jax._src.interpreters.partial_eval', 'DynamicJaxprTracer').DynamicJaxprTracer,
     'DynamicJaxprTracer'),
)


@api_boundary
def _reraise(err: Exception) -> None:
  raise err


def filter_traceback(err: Exception) -> None:
  """Give `err`, caught by the caller, the traceback JAX's API boundary would give it, for the
  caller to re-raise with a bare `raise` (which adds no frame of its own).

  The boundary as a decorator costs a call frame on every call; this costs nothing until an
  error. It filters only where JAX's would: not under another API boundary, nor with
  `JAX_TRACEBACK_FILTERING=off`. Use it only where no API boundary below filtered `err`
  already (each one that filters adds its note to the error).
  """
  tb = err.__traceback__
  try:
    _reraise(err)
  except Exception:
    pass
  # Unfiltered, the traceback still holds `tb`; filtered, this frame heads what is left.
  head = err.__traceback__
  node = head
  while node is not None and node is not tb:
    node = node.tb_next
  err.__traceback__ = tb if node is tb or head is None else head.tb_next


def drop_own_frame(err: Exception) -> None:
  """Take the frame of the function that caught `err`, from a call to a function behind
  JAX's API boundary, off the head of its traceback, unless filtering is off: re-raised with
  a bare `raise`, the error then shows none of meshstate's frames, as that boundary's do."""
  tb = err.__traceback__
  if tb is not None and jax.config.values['jax_traceback_filtering'] != 'off':
    err.__traceback__ = tb.tb_next


def hide_frames_of(path: str) -> None:
  """Hide frames from files under `path` in tracebacks, as JAX hides its own.

  `JAX_TRACEBACK_FILTERING=off` (JAX's switch) shows them again.
  """
  _traceback.register_exclusion(path)


def distributed_client() -> Any:
  """The client of `jax.distributed`'s coordination service (None without several processes).

  Its key-value store lets processes agree on a value without a device collective, which
  cannot run while a function is being traced.
  """
  return getattr(_distributed.global_state, 'client', None)


def vma(aval: Any) -> frozenset:
  """The mesh axes an abstract value varies over inside `shard_map(check_vma=True)`.

  Avals that are no arrays (tokens, references) vary over none.
  """
  if isinstance(aval, _core.ShapedArray):
    return frozenset(aval.mat.varying)
  return frozenset()


def bound_axis_names() -> tuple:
  """Names of the mapped axes bound where this is traced (shard_map, named vmap, pmap)."""
  return tuple(_core.get_axis_env().axis_names())


def tracer_kind(x: Any) -> str:
  """The class name of the tracer `x` for the raw JAX transform that made it, else ''."""
  return next((name for cls, name in _TRACERS if isinstance(x, cls)), '')


def scan_counts(params: dict) -> tuple[int, int]:
  """`(consts, carries)`: how many of a `scan` equation's operands are each, from its params.

  jax 0.10 names the counts (`num_consts`, `num_carry`); later releases pack the operands'
  structure as `ft_in` (consts, carry, xs). Params of neither form raise, never guess.
  """
  if 'num_consts' in params and 'num_carry' in params:
    return params['num_consts'], params['num_carry']
  if 'ft_in' in params:
    consts, carry, _ = params['ft_in'].unpack()
    return len(consts), len(carry)
  raise NotImplementedError(f'meshstate cannot read this JAX release\'s scan parameters '
                            f'({sorted(params)}) (jax {jax.__version__}); install a JAX version '
                            f'that meshstate supports.')


def context_mesh() -> Any:
  """The mesh `jax.set_mesh` set for this thread, or None; readable while a transform traces
  (`jax.sharding.get_mesh` refuses to be called there)."""
  mesh = _mesh.get_concrete_mesh()
  return mesh if mesh is not None and mesh.axis_names else None
