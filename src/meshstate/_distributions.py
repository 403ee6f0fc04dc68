"""The numpy-style distributions, written once as methods of a key-holding state.

`Distributions` is mixed into `meshstate.random.RandomState`, so every instance samples from its
own key (`rs.normal(size=3)`); `meshstate.random` turns each method into a module-level function
that samples from `DEFAULT`. Each method is a pure function of its `key` argument: `@_draws` splits
a key off the state when `key` is None (advancing it) and leaves the state untouched otherwise.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp

__all__ = ['Distributions']

F = TypeVar('F', bound=Callable[..., Any])


def _draws(body: F) -> F:
  """Make `body(self, ..., key, ...)` draw `key` from `self` when it is None.

  If `body` raises, the state gets back the key it had, so bad input consumes no randomness.
  """
  params = list(inspect.signature(body).parameters.values())[1:]
  slot = next(i for i, p in enumerate(params) if p.name == 'key')
  if params[slot].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
    slot = None   # keyword-only (after *dn)

  @functools.wraps(body)
  def method(self, *args, **kwargs):
    at = slot if slot is not None and len(args) > slot else None   # key passed positionally
    if (args[at] if at is not None else kwargs.get('key')) is not None:
      return body(self, *args, **kwargs)
    before = self.value
    key = self.split_key()
    if at is not None:
      args = (*args[:at], key, *args[at + 1:])
    else:
      kwargs['key'] = key
    try:
      return body(self, *args, **kwargs)
    except Exception:
      self.value = before
      raise
  return method  # type: ignore[return-value]


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
  z = sample(key, _shape(size, loc, scale), float if dtype is None else dtype)
  out = loc + scale * z
  return out.astype(dtype) if dtype is not None else out


class Distributions:
  """Numpy-style samplers drawing from the key of the state they are called on.

  Every sampler advances the state's key unless an explicit `key=` is given, in which case the
  state is left untouched.
  """

  __slots__ = ()

  @_draws
  def normal(self, loc=0., scale=1., size=None, key: Any = None, dtype=None):
    """Normal samples with mean `loc` and standard deviation `scale`.

    Args:
      loc: the mean; an array broadcasts against `scale`.
      scale: the standard deviation.
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.
      dtype: the output dtype (default: JAX's default float type).

    Example:
      >>> import jax.numpy as jnp, meshstate.random as mr
      >>> mr.normal(0.0, jnp.ones(3)).shape
      (3,)
      >>> mr.RandomState(0).normal(size=(2, 2)).shape
      (2, 2)
    """
    return _loc_scale(jax.random.normal, loc, scale, size, key, dtype)

  @_draws
  def uniform(self, low=0., high=1., size=None, key: Any = None, dtype=None):
    """Uniform samples on `[low, high)`.

    Args:
      low: the lower bound (included).
      high: the upper bound (excluded).
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.
      dtype: the output dtype (default: JAX's default float type).

    Example:
      >>> import meshstate.random as mr
      >>> x = mr.uniform(2.0, 3.0, size=5)
      >>> bool(((x >= 2) & (x < 3)).all())
      True
    """
    low, high = _arr(low), _arr(high)
    dtype = float if dtype is None else dtype
    return jax.random.uniform(key, _shape(size, low, high), dtype, low, high)

  @_draws
  def randn(self, *dn, key: Any = None):
    """Standard normal samples of shape `dn`.

    Args:
      *dn: the output shape, as separate ints (`randn(2, 3)`).
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.randn(2, 3).shape
      (2, 3)
    """
    return self.normal(size=dn, key=key)

  @_draws
  def rand(self, *dn, key: Any = None):
    """Uniform `[0, 1)` samples of shape `dn`.

    Args:
      *dn: the output shape, as separate ints (`rand(2, 3)`).
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.rand(4).shape
      (4,)
    """
    return self.uniform(size=dn, key=key)

  @_draws
  def random(self, size=None, key: Any = None):
    """Uniform `[0, 1)` samples (numpy's `random.random`).

    Args:
      size: the output shape (an int or a tuple); None: a scalar.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.random((2,)).shape
      (2,)
    """
    return self.uniform(size=size, key=key)

  random_sample = random

  @_draws
  def randint(self, low, high=None, size=None, dtype=int, key: Any = None):
    """Integers from `[low, high)`; with `high` None, from `[0, low)`.

    Args:
      low: the lowest integer drawn, or, with `high` None, the upper bound (excluded).
      high: the upper bound (excluded).
      size: the output shape; None: the broadcast shape of `low` and `high`.
      dtype: the integer dtype of the output.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> x = mr.randint(10, size=6)
      >>> x.shape, bool(((x >= 0) & (x < 10)).all())
      ((6,), True)
    """
    if high is None:
      low, high = 0, low
    low, high = _arr(low), _arr(high)
    return jax.random.randint(key, _shape(size, low, high), low, high, dtype)

  @_draws
  def bernoulli(self, p=0.5, size=None, key: Any = None):
    """Boolean samples that are True with probability `p`.

    Args:
      p: the probability of True; an array broadcasts.
      size: the output shape; None: the shape of `p`.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.bernoulli(0.3, size=4).dtype
      dtype('bool')
    """
    p = _arr(p)
    return jax.random.bernoulli(key, p, _shape(size, p))

  @_draws
  def choice(self, a, size=None, replace=True, p=None, key: Any = None):
    """Samples from `a` (an array, or an int `n` for `arange(n)`), optionally weighted by `p`.

    Args:
      a: the values to choose from (an array), or an int `n` for `arange(n)`.
      size: the output shape; None: one scalar sample.
      replace: draw with replacement.
      p: the probability of each entry of `a` (None: uniform).
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> sorted(mr.choice(5, size=5, replace=False).tolist())
      [0, 1, 2, 3, 4]
    """
    return jax.random.choice(key, _arr(a), _shape(() if size is None else size), replace, _arr(p))

  @_draws
  def permutation(self, x, axis=0, key: Any = None):
    """A random permutation of `arange(x)` (int `x`) or of `x` along `axis`.

    Args:
      x: an int `n` (permute `arange(n)`) or an array to permute.
      axis: the axis of `x` to permute along.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> sorted(mr.permutation(4).tolist())
      [0, 1, 2, 3]
    """
    return jax.random.permutation(key, _arr(x), axis=axis)

  @_draws
  def shuffle(self, x, axis=0, key: Any = None):
    """`x` shuffled along `axis`, returned (JAX arrays cannot be shuffled in place).

    Args:
      x: the array to shuffle.
      axis: the axis to shuffle along.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import jax.numpy as jnp, meshstate.random as mr
      >>> sorted(mr.shuffle(jnp.arange(3)).tolist())
      [0, 1, 2]
    """
    return jax.random.permutation(key, jnp.asarray(x), axis=axis)

  @_draws
  def truncated_normal(self, lower, upper, size=None, loc=0., scale=1., key: Any = None):
    """Normal(`loc`, `scale`) samples restricted to `[lower, upper]` (bounds in output units).

    Args:
      lower: the lower bound, in output units.
      upper: the upper bound, in output units.
      size: the output shape; None: the broadcast shape of the parameters.
      loc: the mean of the untruncated normal.
      scale: its standard deviation.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> x = mr.truncated_normal(-1.0, 2.0, size=100)
      >>> bool(((x >= -1) & (x <= 2)).all())
      True
    """
    lower, upper, loc, scale = map(_arr, (lower, upper, loc, scale))
    z = jax.random.truncated_normal(key, (lower - loc) / scale, (upper - loc) / scale,
                                    _shape(size, lower, upper, loc, scale))
    return jnp.clip(loc + scale * z, lower, upper)

  @_draws
  def exponential(self, scale=1., size=None, key: Any = None):
    """Exponential samples with mean `scale`.

    Args:
      scale: the mean (1 / rate).
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> bool((mr.exponential(2.0, size=3) >= 0).all())
      True
    """
    return _loc_scale(jax.random.exponential, 0., scale, size, key, None)

  @_draws
  def gamma(self, shape, scale=1., size=None, key: Any = None):
    """Gamma samples with shape parameter `shape` and scale `scale`.

    Args:
      shape: the shape parameter (k); an array broadcasts.
      scale: the scale parameter (theta).
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import jax.numpy as jnp, meshstate.random as mr
      >>> mr.gamma(jnp.array([1.0, 2.0])).shape
      (2,)
    """
    shape, scale = _arr(shape), _arr(scale)
    return jax.random.gamma(key, shape, _shape(size, shape, scale)) * scale

  @_draws
  def beta(self, a, b, size=None, key: Any = None):
    """Beta(`a`, `b`) samples on `[0, 1]`.

    Args:
      a: the first shape parameter (alpha).
      b: the second shape parameter (beta).
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.beta(2.0, 3.0, size=(2, 2)).shape
      (2, 2)
    """
    a, b = _arr(a), _arr(b)
    return jax.random.beta(key, a, b, _shape(size, a, b))

  @_draws
  def poisson(self, lam=1., size=None, key: Any = None):
    """Poisson samples with rate `lam` (integers).

    Args:
      lam: the rate (the mean).
      size: the output shape; None: the shape of `lam`.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.poisson(3.0, size=4).shape
      (4,)
    """
    lam = _arr(lam)
    return jax.random.poisson(key, lam, _shape(size, lam))

  @_draws
  def categorical(self, logits, axis=-1, size=None, key: Any = None):
    """Indices drawn from the categorical distribution with unnormalised log-probabilities `logits`.

    With `size` None the result has `logits`' shape without `axis`.

    Args:
      logits: unnormalised log-probabilities, the categories along `axis`.
      axis: the axis of `logits` that holds the categories.
      size: the output shape (it must broadcast with `logits` without `axis`); None: that shape.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import jax.numpy as jnp, meshstate.random as mr
      >>> mr.categorical(jnp.zeros((2, 5))).shape
      (2,)
    """
    return jax.random.categorical(key, _arr(logits), axis, None if size is None else _shape(size))

  @_draws
  def gumbel(self, loc=0., scale=1., size=None, key: Any = None):
    """Gumbel samples with location `loc` and scale `scale`.

    Args:
      loc: the location.
      scale: the scale.
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.gumbel(size=3).shape
      (3,)
    """
    return _loc_scale(jax.random.gumbel, loc, scale, size, key, None)

  @_draws
  def laplace(self, loc=0., scale=1., size=None, key: Any = None):
    """Laplace samples with location `loc` and scale `scale`.

    Args:
      loc: the location (the mean).
      scale: the scale.
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.laplace(1.0, 2.0).shape
      ()
    """
    return _loc_scale(jax.random.laplace, loc, scale, size, key, None)

  @_draws
  def logistic(self, loc=0., scale=1., size=None, key: Any = None):
    """Logistic samples with location `loc` and scale `scale`.

    Args:
      loc: the location (the mean).
      scale: the scale.
      size: the output shape (an int or a tuple); None: the broadcast shape of the parameters.
      key: a PRNG key to draw with instead; the state (`DEFAULT` for the module functions) then
        does not advance.

    Example:
      >>> import meshstate.random as mr
      >>> mr.logistic(size=(1, 2)).shape
      (1, 2)
    """
    return _loc_scale(jax.random.logistic, loc, scale, size, key, None)


SAMPLERS = ('normal', 'uniform', 'randn', 'rand', 'random', 'random_sample', 'randint',
            'bernoulli', 'choice', 'permutation', 'shuffle', 'truncated_normal', 'exponential',
            'gamma', 'beta', 'poisson', 'categorical', 'gumbel', 'laplace', 'logistic')
"""The names of `Distributions`' samplers, each also a function of `meshstate.random`."""
