"""A state-aware `jax.jit`: the states a function touches are carried in and out of one program."""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, overload

from meshstate.transform._engine import StatefulMapping
from meshstate.transform._mappers import JitMapper

__all__ = ['jit']


Decorator = Callable[[Callable[..., Any]], StatefulMapping]


@overload
def jit(fun: Callable[..., Any], *, static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
        donate_states: bool = False) -> StatefulMapping: ...
@overload
def jit(fun: None = None, *, static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
        donate_states: bool = False) -> Decorator: ...
def jit(fun: Callable[..., Any] | None = None, *, static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (), donate_argnums: int | Sequence[int] = (),
        donate_states: bool = False) -> StatefulMapping | Decorator:
  """Compile `fun` with `jax.jit`, reading and writing the `State`s it touches.

  Repeated calls with the same signature run the compiled program only; each written state
  keeps the sharding the program gives it. If `fun` raises, every state keeps its value.
  Without `fun`, returns a decorator.

  Args:
    fun: the function to compile; it may read and write `State`s.
    static_argnums: positional arguments passed to `fun` as Python values (hashable; a new
      value compiles a new program), as in `jax.jit`.
    static_argnames: keyword arguments passed to `fun` as Python values.
    donate_argnums: positional arguments whose buffers the program may reuse for its outputs;
      do not use them after the call.
    donate_states: donate the buffers of the states the call reads and rewrites.

  Returns:
    A `StatefulMapping` (with `lower`), or, without `fun`, a decorator that makes one.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> acc = meshstate.State(jnp.zeros(2))
    >>> @meshstate.transform.jit
    ... def add(x):
    ...   acc.value = acc.value + x
    >>> add(jnp.ones(2)); add(jnp.ones(2)); acc.value.tolist()
    [2.0, 2.0]
  """
  if fun is None:
    return functools.partial(jit, static_argnums=static_argnums, static_argnames=static_argnames,
                             donate_argnums=donate_argnums, donate_states=donate_states)
  return StatefulMapping(fun, in_axes=None, out_axes=None, mapping_fn=JitMapper(),
                         static_argnums=static_argnums, static_argnames=static_argnames,
                         donate_argnums=donate_argnums, donate_states=donate_states)
