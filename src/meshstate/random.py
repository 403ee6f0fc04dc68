"""Random numbers drawn from `RandomState`s, with numpy-style distributions.

Every distribution takes its key from the global `DEFAULT` state (advancing it) unless an explicit
`key=` is passed, in which case `DEFAULT` is left untouched. Each is also a method of every
`RandomState`, drawing from that state's own key instead (`RandomState(0).normal(size=3)`).
Because `DEFAULT` is an ordinary `State`, meshstate's transforms see a function draw from it and
carry its key in and out (and give each device its own key). `DEFAULT` is created on first use,
never at import, so importing meshstate does not start a JAX backend.

Example:
  >>> import meshstate
  >>> meshstate.random.seed(0)
  >>> meshstate.random.normal(size=(2, 3)).shape
  (2, 3)
"""
from __future__ import annotations

import functools
import inspect
import itertools
import threading
from typing import Any, Callable, Concatenate, ParamSpec, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from meshstate._distributions import SAMPLERS, Distributions
from meshstate._compat import distributed_client
from meshstate._state import State, frames

# DEFAULT is served by the module's __getattr__, so that it is created on first use; the
# samplers are the methods of `Distributions` (SAMPLERS), each also a function here.
__all__ = ['RandomState', 'DEFAULT', 'seed', 'split_key', 'normal', 'uniform', 'randn', 'rand',
           'random', 'random_sample', 'randint', 'bernoulli', 'choice', 'permutation', 'shuffle',
           'truncated_normal', 'exponential', 'gamma', 'beta', 'poisson', 'categorical', 'gumbel',
           'laplace', 'logistic']
assert __all__[4:] == list(SAMPLERS)

P = ParamSpec('P')
R = TypeVar('R')


_agreed = itertools.count()   # unseeded keys made so far: the same sequence in every process


def _entropy_seed() -> int:
  """A fresh seed from the OS; with several processes, process 0's, so that keys agree.

  Process 0 publishes its seed in `jax.distributed`'s key-value store (no device collective,
  so this also works while a function is traced); every process makes its unseeded keys in
  the same order, so the n-th one agrees everywhere.
  """
  seed = int(cast(int, np.random.SeedSequence().entropy) % 2 ** 32)
  client = distributed_client()
  if client is None or jax.process_count() == 1:
    return seed
  name = f'meshstate/random/seed/{next(_agreed)}'
  if jax.process_index() == 0:
    client.key_value_set(name, str(seed))
    return seed
  return int(client.blocking_key_value_get(name, 60_000))


_NO_MESH = jax.sharding.AbstractMesh((), ())


def _as_key(seed_or_key: Any) -> Any:
  """An int seed (or None: fresh OS entropy) -> a legacy uint32[2] key; a key -> itself."""
  if seed_or_key is None:
    seed_or_key = _entropy_seed()
  if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
    # A concrete seed gives a concrete key even while a transform is tracing, also under the
    # abstract mesh a trace may have set (an eager op cannot lower against one).
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(_NO_MESH):
      return jax.random.PRNGKey(int(seed_or_key))
  dtype = getattr(seed_or_key, 'dtype', None)
  if dtype is None:
    seed_or_key = np.asarray(seed_or_key)
    dtype = seed_or_key.dtype
  shape = jnp.shape(seed_or_key)
  if jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return seed_or_key
  if shape == () and jnp.issubdtype(dtype, jnp.integer):
    return jax.random.PRNGKey(seed_or_key)  # a traced or array-valued integer seed
  if shape == (2,) and dtype == np.uint32:
    return seed_or_key
  raise TypeError(f'RandomState expects an int seed, a uint32[2] PRNG key or a typed key; '
                  f'got {type(seed_or_key).__name__} with shape {shape} and dtype {dtype}.')


class RandomState(State, Distributions):
  """A `State` holding a PRNG key (a legacy `uint32[2]` key from `jax.random.PRNGKey`).

  `RandomState(seed)` seeds it from an int, `RandomState(key)` stores a key as is, and
  `RandomState()` seeds it from the operating system's entropy. Every distribution of
  `meshstate.random` is also a method that samples from (and advances) this state's key, numpy
  `RandomState` style; an explicit `key=` leaves the state untouched.

  Args:
    seed_or_key: an int seed, a PRNG key (a `uint32[2]` array or a typed key), or None for a
      seed from the operating system's entropy (the same in every process when there are
      several).
    name: a name for messages and `describe` tables.

  Example:
    >>> from meshstate.random import RandomState
    >>> rs = RandomState(0)
    >>> rs.value.tolist()
    [0, 0]
    >>> rs.split_key(3).shape
    (3, 2)
    >>> rs.randn(2, 3).shape, rs.uniform(0.0, 2.0, size=4).shape
    ((2, 3), (4,))
  """

  __slots__ = ()

  def __init__(self, seed_or_key: Any = None, name: str | None = None):
    super().__init__(_as_key(seed_or_key), name=name)

  def seed(self, seed_or_key: Any = None) -> None:
    """Reset the key from an int seed, a key, or (None) fresh entropy.

    Args:
      seed_or_key: an int seed, a PRNG key, or None for fresh entropy.

    Example:
      >>> rs = RandomState(1); rs.seed(0)
      >>> rs.value.tolist()
      [0, 0]
    """
    self.value = _as_key(seed_or_key)

  def split_key(self, n: int | None = None) -> Any:
    """Advance this state's key and return one fresh key (`n` None) or `n` keys stacked.

    Args:
      n: how many keys to return, stacked along a new axis 0; None returns one key.

    Example:
      >>> rs = RandomState(0)
      >>> rs.split_key().shape, rs.split_key(4).shape
      ((2,), (4, 2))
    """
    keys = jax.random.split(self.value, 2 if n is None else n + 1)
    self.value = keys[0]
    return keys[1] if n is None else keys[1:]


RandomState.__module__ = 'meshstate.random'

DEFAULT: RandomState   # declared for type checkers; the module's __getattr__ makes it
_default_state: RandomState | None = None
_default_lock = threading.Lock()


def _default() -> RandomState:
  """The global `RandomState`, created (from OS entropy) on first use."""
  global _default_state
  if _default_state is None:
    with _default_lock:
      if _default_state is None:
        state = RandomState(None, name='DEFAULT')
        # Created while a transform traces? It is global, not local to that trace: let the
        # frame record its reads and writes like any other state's.
        for frame in frames():
          frame.created.discard(id(state))
        _default_state = state
  return _default_state


def __getattr__(name: str) -> Any:
  if name == 'DEFAULT':
    return _default()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted(set(globals()) | {'DEFAULT'})


def seed(seed: Any = None) -> None:
  """Reseed the global `DEFAULT` state (None: fresh entropy).

  Args:
    seed: an int seed, a PRNG key, or None for fresh entropy.

  Example:
    >>> import meshstate.random as mr
    >>> mr.seed(3); a = mr.normal()
    >>> mr.seed(3); bool(a == mr.normal())
    True
  """
  _default().seed(seed)


def split_key(n: int | None = None) -> Any:
  """One new key (or `n` stacked keys) drawn from `DEFAULT`, which advances.

  Args:
    n: how many keys to return, stacked along a new axis 0; None returns one key.

  Example:
    >>> import meshstate.random as mr
    >>> mr.split_key(2).shape
    (2, 2)
  """
  return _default().split_key(n)


# --- module-level distributions: the methods of `Distributions`, drawing from DEFAULT ------

def _on_default(method: Callable[Concatenate[Any, P], R]) -> Callable[P, R]:
  """`method` as a function that samples from `DEFAULT` (created on first use)."""
  @functools.wraps(method)
  def draw(*args: P.args, **kwargs: P.kwargs) -> R:
    return method(_default(), *args, **kwargs)
  sig = inspect.signature(method)
  draw.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore
  draw.__module__, draw.__qualname__ = __name__, method.__name__
  return draw


normal = _on_default(RandomState.normal)
uniform = _on_default(RandomState.uniform)
randn = _on_default(RandomState.randn)
rand = _on_default(RandomState.rand)
random = _on_default(RandomState.random)
random_sample = random
randint = _on_default(RandomState.randint)
bernoulli = _on_default(RandomState.bernoulli)
choice = _on_default(RandomState.choice)
permutation = _on_default(RandomState.permutation)
shuffle = _on_default(RandomState.shuffle)
truncated_normal = _on_default(RandomState.truncated_normal)
exponential = _on_default(RandomState.exponential)
gamma = _on_default(RandomState.gamma)
beta = _on_default(RandomState.beta)
poisson = _on_default(RandomState.poisson)
categorical = _on_default(RandomState.categorical)
gumbel = _on_default(RandomState.gumbel)
laplace = _on_default(RandomState.laplace)
logistic = _on_default(RandomState.logistic)
