"""Random numbers drawn from `RandomState`s, with numpy-style distributions.

Every distribution takes its key from the global `DEFAULT` state (advancing it) unless an explicit
`key=` is passed, in which case `DEFAULT` is left untouched. Because `DEFAULT` is an ordinary
`State`, meshstate's transforms see a function draw from it and carry its key in and out (and give
each device its own key). `DEFAULT` is created on first use, never at import, so importing
meshstate does not start a JAX backend.

Example:
  >>> import meshstate
  >>> meshstate.random.seed(0)
  >>> meshstate.random.normal(size=(2, 3)).shape
  (2, 3)
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshstate._state import State, frames

__all__ = ['RandomState', 'DEFAULT', 'seed', 'split_key',
           'normal', 'uniform', 'randn', 'rand', 'random', 'random_sample', 'randint',
           'bernoulli', 'choice', 'permutation', 'shuffle', 'truncated_normal', 'exponential',
           'gamma', 'beta', 'poisson', 'categorical', 'gumbel', 'laplace', 'logistic']


def _entropy_seed() -> int:
  return int(np.random.SeedSequence().entropy % 2 ** 32)


def _as_key(seed_or_key: Any) -> Any:
  """An int seed (or None: fresh OS entropy) -> a legacy uint32[2] key; a key -> itself."""
  if seed_or_key is None:
    seed_or_key = _entropy_seed()
  if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
    # A concrete seed gives a concrete key even while a transform is tracing.
    with jax.ensure_compile_time_eval():
      return jax.random.PRNGKey(int(seed_or_key))
  dtype = getattr(seed_or_key, 'dtype', None)
  if dtype is None:
    seed_or_key = np.asarray(seed_or_key)
    dtype = seed_or_key.dtype
  shape = jnp.shape(seed_or_key)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return seed_or_key
  if shape == () and jnp.issubdtype(dtype, jnp.integer):
    return jax.random.PRNGKey(seed_or_key)  # a traced or array-valued integer seed
  if shape == (2,) and dtype == np.uint32:
    return seed_or_key
  raise TypeError(f'RandomState expects an int seed, a uint32[2] PRNG key or a typed key; '
                  f'got {type(seed_or_key).__name__} with shape {shape} and dtype {dtype}.')


class RandomState(State):
  """A `State` holding a PRNG key (a legacy `uint32[2]` key from `jax.random.PRNGKey`).

  `RandomState(seed)` seeds it from an int, `RandomState(key)` stores a key as is, and
  `RandomState()` seeds it from the operating system's entropy.

  Example:
    >>> from meshstate.random import RandomState
    >>> rs = RandomState(0)
    >>> rs.value.tolist()
    [0, 0]
    >>> rs.split_key(3).shape
    (3, 2)
  """

  __slots__ = ()

  def __init__(self, seed_or_key: Any = None, name: str | None = None):
    super().__init__(_as_key(seed_or_key), name=name)

  def seed(self, seed_or_key: Any = None) -> None:
    """Reset the key from an int seed, a key, or (None) fresh entropy.

    Example:
      >>> rs = RandomState(1); rs.seed(0)
      >>> rs.value.tolist()
      [0, 0]
    """
    self.value = _as_key(seed_or_key)

  def split_key(self, n: int | None = None) -> Any:
    """Advance this state's key and return one fresh key (`n` None) or `n` keys stacked.

    Example:
      >>> rs = RandomState(0)
      >>> rs.split_key().shape, rs.split_key(4).shape
      ((2,), (4, 2))
    """
    keys = jax.random.split(self.value, 2 if n is None else n + 1)
    self.value = keys[0]
    return keys[1] if n is None else keys[1:]


RandomState.__module__ = 'meshstate.random'

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

  Example:
    >>> import meshstate.random as mr
    >>> mr.seed(3); a = mr.normal()
    >>> mr.seed(3); bool(a == mr.normal())
    True
  """
  _default().seed(seed)


def split_key(n: int | None = None) -> Any:
  """One new key (or `n` stacked keys) drawn from `DEFAULT`, which advances.

  Example:
    >>> import meshstate.random as mr
    >>> mr.split_key(2).shape
    (2, 2)
  """
  return _default().split_key(n)


# --- helpers -------------------------------------------------------------------------------

def _key(key: Any) -> Any:
  return key if key is not None else _default().split_key()


def _arr(x: Any) -> Any:
  return jnp.asarray(x) if isinstance(x, (list, tuple)) else x


def _shape(size: Any, *params: Any) -> tuple[int, ...]:
  """`size` as a shape tuple; None -> the broadcast shape of the parameters."""
  if size is None:
    return jnp.broadcast_shapes(*(jnp.shape(p) for p in params))
  return tuple(size) if isinstance(size, Sequence) else (int(size),)


def _loc_scale(sample: Callable, loc: Any, scale: Any, size: Any, key: Any, dtype: Any) -> Any:
  """`loc + scale * z` with `z` from a standard sampler `sample(key, shape, dtype)`."""
  loc, scale = _arr(loc), _arr(scale)
  z = sample(_key(key), _shape(size, loc, scale), float if dtype is None else dtype)
  out = loc + scale * z
  return out.astype(dtype) if dtype is not None else out


# --- distributions -------------------------------------------------------------------------

def normal(loc=0., scale=1., size=None, key=None, dtype=None):
  """Normal samples with mean `loc` and standard deviation `scale`.

  Example:
    >>> import jax.numpy as jnp, meshstate.random as mr
    >>> mr.normal(0.0, jnp.ones(3)).shape
    (3,)
  """
  return _loc_scale(jax.random.normal, loc, scale, size, key, dtype)


def uniform(low=0., high=1., size=None, key=None, dtype=None):
  """Uniform samples on `[low, high)`.

  Example:
    >>> import meshstate.random as mr
    >>> x = mr.uniform(2.0, 3.0, size=5)
    >>> bool(((x >= 2) & (x < 3)).all())
    True
  """
  low, high = _arr(low), _arr(high)
  dtype = float if dtype is None else dtype
  return jax.random.uniform(_key(key), _shape(size, low, high), dtype, low, high)


def randn(*dn, key=None):
  """Standard normal samples of shape `dn`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.randn(2, 3).shape
    (2, 3)
  """
  return normal(size=dn, key=key)


def rand(*dn, key=None):
  """Uniform `[0, 1)` samples of shape `dn`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.rand(4).shape
    (4,)
  """
  return uniform(size=dn, key=key)


def random(size=None, key=None):
  """Uniform `[0, 1)` samples (numpy's `random.random`).

  Example:
    >>> import meshstate.random as mr
    >>> mr.random((2,)).shape
    (2,)
  """
  return uniform(size=size, key=key)


random_sample = random


def randint(low, high=None, size=None, dtype=int, key=None):
  """Integers from `[low, high)`; with `high` None, from `[0, low)`.

  Example:
    >>> import meshstate.random as mr
    >>> x = mr.randint(10, size=6)
    >>> x.shape, bool(((x >= 0) & (x < 10)).all())
    ((6,), True)
  """
  if high is None:
    low, high = 0, low
  low, high = _arr(low), _arr(high)
  return jax.random.randint(_key(key), _shape(size, low, high), low, high, dtype)


def bernoulli(p=0.5, size=None, key=None):
  """Boolean samples that are True with probability `p`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.bernoulli(0.3, size=4).dtype
    dtype('bool')
  """
  p = _arr(p)
  return jax.random.bernoulli(_key(key), p, _shape(size, p))


def choice(a, size=None, replace=True, p=None, key=None):
  """Samples from `a` (an array, or an int `n` for `arange(n)`), optionally weighted by `p`.

  Example:
    >>> import meshstate.random as mr
    >>> sorted(mr.choice(5, size=5, replace=False).tolist())
    [0, 1, 2, 3, 4]
  """
  return jax.random.choice(_key(key), _arr(a), _shape(() if size is None else size),
                           replace, _arr(p))


def permutation(x, axis=0, key=None):
  """A random permutation of `arange(x)` (int `x`) or of `x` along `axis`.

  Example:
    >>> import meshstate.random as mr
    >>> sorted(mr.permutation(4).tolist())
    [0, 1, 2, 3]
  """
  return jax.random.permutation(_key(key), _arr(x), axis=axis)


def shuffle(x, axis=0, key=None):
  """`x` shuffled along `axis`, returned (JAX arrays cannot be shuffled in place).

  Example:
    >>> import jax.numpy as jnp, meshstate.random as mr
    >>> sorted(mr.shuffle(jnp.arange(3)).tolist())
    [0, 1, 2]
  """
  return jax.random.permutation(_key(key), jnp.asarray(x), axis=axis)


def truncated_normal(lower, upper, size=None, loc=0., scale=1., key=None):
  """Normal(`loc`, `scale`) samples restricted to `[lower, upper]` (bounds in output units).

  Example:
    >>> import meshstate.random as mr
    >>> x = mr.truncated_normal(-1.0, 2.0, size=100)
    >>> bool(((x >= -1) & (x <= 2)).all())
    True
  """
  lower, upper, loc, scale = map(_arr, (lower, upper, loc, scale))
  z = jax.random.truncated_normal(_key(key), (lower - loc) / scale, (upper - loc) / scale,
                                  _shape(size, lower, upper, loc, scale))
  return jnp.clip(loc + scale * z, lower, upper)


def exponential(scale=1., size=None, key=None):
  """Exponential samples with mean `scale`.

  Example:
    >>> import meshstate.random as mr
    >>> bool((mr.exponential(2.0, size=3) >= 0).all())
    True
  """
  return _loc_scale(jax.random.exponential, 0., scale, size, key, None)


def gamma(shape, scale=1., size=None, key=None):
  """Gamma samples with shape parameter `shape` and scale `scale`.

  Example:
    >>> import jax.numpy as jnp, meshstate.random as mr
    >>> mr.gamma(jnp.array([1.0, 2.0])).shape
    (2,)
  """
  shape, scale = _arr(shape), _arr(scale)
  return jax.random.gamma(_key(key), shape, _shape(size, shape, scale)) * scale


def beta(a, b, size=None, key=None):
  """Beta(`a`, `b`) samples on `[0, 1]`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.beta(2.0, 3.0, size=(2, 2)).shape
    (2, 2)
  """
  a, b = _arr(a), _arr(b)
  return jax.random.beta(_key(key), a, b, _shape(size, a, b))


def poisson(lam=1., size=None, key=None):
  """Poisson samples with rate `lam` (integers).

  Example:
    >>> import meshstate.random as mr
    >>> mr.poisson(3.0, size=4).shape
    (4,)
  """
  lam = _arr(lam)
  return jax.random.poisson(_key(key), lam, _shape(size, lam))


def categorical(logits, axis=-1, size=None, key=None):
  """Indices drawn from the categorical distribution with unnormalised log-probabilities `logits`.

  With `size` None the result has `logits`' shape without `axis`.

  Example:
    >>> import jax.numpy as jnp, meshstate.random as mr
    >>> mr.categorical(jnp.zeros((2, 5))).shape
    (2,)
  """
  return jax.random.categorical(_key(key), _arr(logits), axis,
                                None if size is None else _shape(size))


def gumbel(loc=0., scale=1., size=None, key=None):
  """Gumbel samples with location `loc` and scale `scale`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.gumbel(size=3).shape
    (3,)
  """
  return _loc_scale(jax.random.gumbel, loc, scale, size, key, None)


def laplace(loc=0., scale=1., size=None, key=None):
  """Laplace samples with location `loc` and scale `scale`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.laplace(1.0, 2.0).shape
    ()
  """
  return _loc_scale(jax.random.laplace, loc, scale, size, key, None)


def logistic(loc=0., scale=1., size=None, key=None):
  """Logistic samples with location `loc` and scale `scale`.

  Example:
    >>> import meshstate.random as mr
    >>> mr.logistic(size=(1, 2)).shape
    (1, 2)
  """
  return _loc_scale(jax.random.logistic, loc, scale, size, key, None)
