"""State-aware autodiff: `grad`, `value_and_grad`, `vjp`, `jacrev`, `jacfwd`.

Each differentiates with respect to the values of `grad_states` (a `State`, a sequence or a dict
of them) and then of the positional arguments in `argnums`, with JAX's own transform underneath:
the function runs once under it as a pure function of those values (`_carry.call`), and the
states it writes (batch-norm statistics, random keys) come out as auxiliary data and are written
back. Results follow brainstate: state gradients first, in `grad_states`' container, then argument
gradients, as `(state_grads, arg_grads)` when both are asked for.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, overload

import jax
import jax.numpy as jnp

from meshstate._state import State
from meshstate.transform import _carry

__all__ = ['grad', 'value_and_grad', 'vjp', 'jacrev', 'jacfwd']


def _flatten_states(grad_states: Any, where: str):
  """`(unique states, position of each leaf among them, treedef)` of `grad_states`."""
  if grad_states is None:
    return [], [], None
  flat, tree = jax.tree_util.tree_flatten_with_path(
      grad_states, is_leaf=lambda x: isinstance(x, State))
  unique: dict[State, int] = {}
  for path, leaf in flat:
    if not isinstance(leaf, State):
      raise TypeError(f'{where}: grad_states{jax.tree_util.keystr(path)} is of type '
                      f'{type(leaf).__name__}, not a State.')
    unique.setdefault(leaf, len(unique))
  return list(unique), [unique[s] for _, s in flat], tree


def _check_float(states: Sequence[State], where: str, allow_int: bool) -> None:
  if allow_int:
    return
  for state in states:
    for x in jax.tree.leaves(state.value):
      dtype = jnp.result_type(x)
      if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f'{where}: {_carry.label(state)} in grad_states holds {dtype.name} '
                        f'values; differentiate only float states, or pass allow_int=True.')


def _argnums(argnums: Any, n_args: int, where: str) -> tuple[int, ...]:
  nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  for i in nums:
    if not isinstance(i, int) or not -n_args <= i < n_args:
      raise ValueError(f'{where}: argnums contains {i!r}, but the function was called with '
                       f'{n_args} positional arguments.')
  return tuple(i % n_args for i in nums)


class _Diff:
  """One JAX AD transform applied to a state-reading function, states and argnums resolved."""

  def __init__(self, fun: Callable, grad_states: Any, argnums: Any, has_aux: bool | None,
               where: str, allow_int: bool = True):
    if not callable(fun):
      raise TypeError(f'{where} needs a callable, got {type(fun).__name__}.')
    self.fun, self.where, self.has_aux = fun, where, bool(has_aux)
    self.states, self.index, self.tree = _flatten_states(grad_states, where)
    self.allow_int = allow_int
    self.argnums = 0 if argnums is None and grad_states is None else argnums

  def pure(self, args: tuple, kwargs: dict, written: list) -> Callable:
    """`(state values, differentiated args) -> (value, (value, aux, new state values))`."""
    nums = self.argnums_for(args)

    def run(state_vals, arg_vals):
      full = list(args)
      for i, v in zip(nums, arg_vals):
        full[i] = v
      out, new = _carry.call(self.fun, self.states, state_vals, *full, **kwargs)
      if self.has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
          raise TypeError(f'{self.where}(has_aux=True): the function must return a pair '
                          f'(value, aux), got {type(out).__name__}.')
        value, aux = out
      else:
        value, aux = out, None
      written[:] = list(new)
      return value, (value, aux, list(new.values()))
    return run

  def argnums_for(self, args: tuple) -> tuple[int, ...]:
    return () if self.argnums is None else _argnums(self.argnums, len(args), self.where)

  def inputs(self, args: tuple) -> tuple[list, tuple]:
    _check_float(self.states, self.where, self.allow_int)
    return _carry.read(self.states), tuple(args[i] for i in self.argnums_for(args))

  def assemble(self, grads: tuple) -> Any:
    """`(state grads, arg grads)` of the pure function -> the user's container(s)."""
    state_grads, arg_grads = grads
    if self.argnums is not None:
      arg_grads = arg_grads[0] if isinstance(self.argnums, int) else tuple(arg_grads)
    if self.tree is None:
      return arg_grads
    state_grads = self.tree.unflatten([state_grads[i] for i in self.index])
    return state_grads if self.argnums is None else (state_grads, arg_grads)

  def finish(self, written: list, new: list, grads: tuple, value: Any, aux: Any,
             return_value: bool) -> Any:
    _carry.write_back(written, new, self.where)
    grads = self.assemble(grads)
    if return_value and self.has_aux:
      return grads, value, aux
    if self.has_aux:
      return grads, aux
    if return_value:
      return grads, value
    return grads


def _transformed(where: str, transform: Callable, fun, grad_states, argnums, has_aux,
                 return_value, **options) -> Callable:
  diff = _Diff(fun, grad_states, argnums, has_aux, where, options.get('allow_int', True))

  @functools.wraps(fun)
  def call(*args, **kwargs):
    written: list = []
    state_vals, arg_vals = diff.inputs(args)
    grads, (value, aux, new) = transform(diff.pure(args, kwargs, written), argnums=(0, 1),
                                         has_aux=True, **options)(state_vals, arg_vals)
    return diff.finish(written, new, grads, value, aux, return_value)
  return call


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@overload
def grad(fun: Callable[..., Any], grad_states: Any = None, argnums: Any = None,
         holomorphic: bool = False, allow_int: bool = False, has_aux: bool | None = None,
         return_value: bool = False) -> Callable[..., Any]: ...
@overload
def grad(fun: None = None, grad_states: Any = None, argnums: Any = None,
         holomorphic: bool = False, allow_int: bool = False, has_aux: bool | None = None,
         return_value: bool = False) -> Decorator: ...
def grad(fun: Callable[..., Any] | None = None, grad_states: Any = None, argnums: Any = None,
         holomorphic: bool = False, allow_int: bool = False, has_aux: bool | None = None,
         return_value: bool = False) -> Callable[..., Any] | Decorator:
  """The gradient of `fun` with respect to `grad_states` and/or positional `argnums`.

  Returns a function giving `grads`, `(grads, value)` with `return_value`, `(grads, aux)` with
  `has_aux`, `(grads, value, aux)` with both. `grads` is the state gradients in `grad_states`'
  container (one `State`, a sequence, a dict), then the argument gradients: `(state_grads,
  arg_grads)` when both are asked for; with neither, `argnums=0`. States `fun` writes keep the
  values it wrote. Without `fun`, returns a decorator.

  Args:
    fun: the function to differentiate; it may read and write `State`s.
    grad_states: the states to differentiate with respect to: one `State`, or a pytree
      (sequence, dict) of them; the gradients come back in the same container.
    argnums: positional argument(s) to differentiate with respect to: an int or a tuple of
      ints. None: none when `grad_states` is given, else 0.
    holomorphic: whether `fun` is holomorphic (complex inputs and outputs), as in `jax.grad`.
    allow_int: allow integer states and arguments (their gradients are float0 zeros).
    has_aux: `fun` returns `(value, aux)`; `aux` is returned beside the gradients.
    return_value: also return `fun`'s value.

  Returns:
    A function with `fun`'s arguments (or, without `fun`, a decorator that makes one).

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array([1., 2.]))
    >>> calls = meshstate.State(jnp.int32(0))
    >>> def loss(x):
    ...   calls.value = calls.value + 1
    ...   return jnp.sum(w.value * x) ** 2
    >>> g_w, g_x = meshstate.transform.grad(loss, grad_states=w, argnums=0)(jnp.ones(2))
    >>> g_w.tolist(), g_x.tolist(), int(calls.value)
    ([6.0, 6.0], [6.0, 12.0], 1)
  """
  if fun is None:
    return functools.partial(grad, grad_states=grad_states, argnums=argnums,
                             holomorphic=holomorphic, allow_int=allow_int, has_aux=has_aux,
                             return_value=return_value)
  return _transformed('grad', jax.grad, fun, grad_states, argnums, has_aux, return_value,
                      holomorphic=holomorphic, allow_int=allow_int)


@overload
def value_and_grad(fun: Callable[..., Any], grad_states: Any = None, argnums: Any = None,
                   has_aux: bool | None = None, holomorphic: bool = False,
                   allow_int: bool = False) -> Callable[..., Any]: ...
@overload
def value_and_grad(fun: None = None, grad_states: Any = None, argnums: Any = None,
                   has_aux: bool | None = None, holomorphic: bool = False,
                   allow_int: bool = False) -> Decorator: ...
def value_and_grad(fun: Callable[..., Any] | None = None, grad_states: Any = None,
                   argnums: Any = None, has_aux: bool | None = None, holomorphic: bool = False,
                   allow_int: bool = False) -> Callable[..., Any] | Decorator:
  """Like `jax.value_and_grad`: `(value, grads)`, or `((value, aux), grads)` with `has_aux`.

  `grads` is as in `grad` (state gradients in `grad_states`' container, then argnum gradients).
  Without `fun`, returns a decorator.

  Args:
    fun: the function to differentiate; it may read and write `State`s.
    grad_states: the states to differentiate with respect to: one `State`, or a pytree
      (sequence, dict) of them; the gradients come back in the same container.
    argnums: positional argument(s) to differentiate with respect to: an int or a tuple of
      ints. None: none when `grad_states` is given, else 0.
    has_aux: `fun` returns `(value, aux)`.
    holomorphic: whether `fun` is holomorphic, as in `jax.value_and_grad`.
    allow_int: allow integer states and arguments.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array(3.))
    >>> v, g = meshstate.transform.value_and_grad(lambda: w.value ** 2, grad_states=w)()
    >>> float(v), float(g)
    (9.0, 6.0)
  """
  if fun is None:
    return functools.partial(value_and_grad, grad_states=grad_states, argnums=argnums,
                             has_aux=has_aux, holomorphic=holomorphic, allow_int=allow_int)
  inner = grad(fun, grad_states, argnums, holomorphic, allow_int, has_aux, return_value=True)

  @functools.wraps(fun)
  def call(*args, **kwargs):
    if has_aux:
      grads, value, aux = inner(*args, **kwargs)
      return (value, aux), grads
    grads, value = inner(*args, **kwargs)
    return value, grads
  return call


def jacrev(fun: Callable, grad_states: Any = None, argnums: Any = None,
           has_aux: bool | None = None, return_value: bool = False, holomorphic: bool = False,
           allow_int: bool = False) -> Callable:
  """Reverse-mode Jacobian of `fun` with respect to `grad_states` and/or `argnums`.

  Results are arranged as in `grad`.

  Args:
    fun: the function to differentiate; it may read and write `State`s.
    grad_states: the states to differentiate with respect to: one `State`, or a pytree
      (sequence, dict) of them; the gradients come back in the same container.
    argnums: positional argument(s) to differentiate with respect to: an int or a tuple of
      ints. None: none when `grad_states` is given, else 0.
    has_aux: `fun` returns `(value, aux)`; `aux` is returned beside the Jacobian.
    return_value: also return `fun`'s value.
    holomorphic: whether `fun` is holomorphic, as in `jax.jacrev`.
    allow_int: allow integer states and arguments.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array([1., 2.]))
    >>> meshstate.transform.jacrev(lambda: w.value ** 2, grad_states=w)().tolist()
    [[2.0, 0.0], [0.0, 4.0]]
  """
  return _transformed('jacrev', jax.jacrev, fun, grad_states, argnums, has_aux, return_value,
                      holomorphic=holomorphic, allow_int=allow_int)


def jacfwd(fun: Callable, grad_states: Any = None, argnums: Any = None,
           has_aux: bool | None = None, return_value: bool = False,
           holomorphic: bool = False) -> Callable:
  """Forward-mode Jacobian of `fun` with respect to `grad_states` and/or `argnums`.

  Results are arranged as in `grad`.

  Args:
    fun: the function to differentiate; it may read and write `State`s.
    grad_states: the states to differentiate with respect to: one `State`, or a pytree
      (sequence, dict) of them; the gradients come back in the same container.
    argnums: positional argument(s) to differentiate with respect to: an int or a tuple of
      ints. None: none when `grad_states` is given, else 0.
    has_aux: `fun` returns `(value, aux)`; `aux` is returned beside the Jacobian.
    return_value: also return `fun`'s value.
    holomorphic: whether `fun` is holomorphic, as in `jax.jacfwd`.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array([1., 2.]))
    >>> meshstate.transform.jacfwd(lambda x: w.value * x, argnums=0)(jnp.ones(2)).tolist()
    [[1.0, 0.0], [0.0, 2.0]]
  """
  return _transformed('jacfwd', jax.jacfwd, fun, grad_states, argnums, has_aux, return_value,
                      holomorphic=holomorphic)


def vjp(fun: Callable, *primals: Any, grad_states: Any = None, argnums: Any = 0,
        has_aux: bool = False) -> tuple:
  """`(out, vjp_fn)` (and `aux` with `has_aux`): `fun`'s pullback w.r.t. states and/or args.

  `vjp_fn(cotangent)` gives the cotangents arranged as in `grad`: state cotangents in
  `grad_states`' container, then those of `argnums` (None: states only). States `fun` writes
  keep the values it wrote.

  Args:
    fun: the function; it may read and write `State`s.
    *primals: the positional arguments to call `fun` with.
    grad_states: the states to pull cotangents back to: one `State`, or a pytree of them.
    argnums: the positional argument(s) to pull cotangents back to (int or tuple); None for
      states only.
    has_aux: `fun` returns `(value, aux)`; `aux` is returned third.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array([2., 3.]))
    >>> out, pull = meshstate.transform.vjp(lambda x: w.value * x, jnp.ones(2), grad_states=w)
    >>> g_w, g_x = pull(jnp.ones(2))
    >>> g_w.tolist(), g_x.tolist()
    ([1.0, 1.0], [2.0, 3.0])
  """
  diff = _Diff(fun, grad_states, None if not primals else argnums, has_aux, 'vjp')
  written: list = []
  state_vals, arg_vals = diff.inputs(primals)
  out, pull, (_, aux, new) = jax.vjp(diff.pure(primals, {}, written), state_vals, arg_vals,
                                     has_aux=True)
  _carry.write_back(written, new, 'vjp')

  def vjp_fn(cotangent):
    return diff.assemble(pull(cotangent))

  return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)
