"""State-aware control flow: `for_loop`, `scan`, `while_loop`, `cond`, `switch`, `checkpoint`.

Each finds the states its functions write (`_carry.carry`), carries them through the `lax`
primitive next to the user's carry, and writes the final values back; states only read are
closed over. Branches that write different states merge: a state a branch leaves alone keeps its
value on that branch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, overload

import jax
import jax.numpy as jnp
from jax import lax

from meshstate.transform import _carry
from meshstate.transform._progress import progress_runner
from meshstate.transform._discover import vma_of

__all__ = ['for_loop', 'scan', 'while_loop', 'cond', 'switch', 'checkpoint', 'remat']


def _length(where: str, xs: Any, length: int | None) -> int:
  """The number of steps: `length`, or the leading size shared by every leaf of `xs`."""
  sizes = []
  for path, x in jax.tree_util.tree_flatten_with_path(xs)[0]:
    shape = jnp.shape(x)
    if not shape:
      raise ValueError(f'{where}: xs{jax.tree_util.keystr(path)} is a scalar; every leaf of xs '
                       f'needs a leading axis to loop over.')
    sizes.append((jax.tree_util.keystr(path), shape[0]))
  if length is not None:
    if not isinstance(length, int) or length < 0:
      raise ValueError(f'{where}: length must be a non-negative int, got {length!r}.')
  found = {n for _, n in sizes}
  if len(found) > 1 or (found and length is not None and found != {length}):
    listed = ', '.join(f'xs{p} has {n}' for p, n in sizes)
    extra = f' and length={length}' if length is not None else ''
    raise ValueError(f'{where}: the leading sizes of xs disagree ({listed}{extra}).')
  if found:
    return found.pop()
  if length is None:
    raise ValueError(f'{where}: there is nothing to loop over; pass xs with a leading axis or '
                     f'length=.')
  return length


def _first(x: Any) -> Any:
  if jnp.shape(x)[0]:
    return x[0]
  zero = jnp.zeros(jnp.shape(x)[1:], jnp.result_type(x))   # an empty loop: the slice's type
  vma = tuple(sorted(vma_of(x), key=str))
  return lax.pcast(zero, vma, to='varying') if vma else zero


def _step(xs: Any) -> Any:
  """One step's slice of `xs`, for discovery."""
  return jax.tree.map(_first, xs)


def scan(f: Callable, init: Any, xs: Any = None, length: int | None = None,
         reverse: bool = False, unroll: int | bool = 1, pbar: Any = None) -> tuple[Any, Any]:
  """`jax.lax.scan` of `f(carry, x) -> (carry, y)` that carries the `State`s `f` writes.

  Returns `(final carry, stacked ys)`. States written in `f` hold their final values after the
  loop; a write that changes a state's shape or dtype is an error naming the state. `pbar`
  shows progress: an int `N` reports every N steps, or pass a `ProgressBar`.

  Args:
    f: the step, `f(carry, x) -> (carry, y)`; it may read and write `State`s.
    init: the initial carry (a pytree of arrays).
    xs: the values to loop over, sliced along axis 0 (a pytree); None with `length`.
    length: the number of steps, when `xs` is None (else it must agree with `xs`).
    reverse: loop from the last slice to the first, as in `jax.lax.scan`.
    unroll: how many steps to unroll per loop iteration, as in `jax.lax.scan`.
    pbar: progress while the loop runs on the device: an int `N` reports every N steps,
      `True` about 20 times, or a `ProgressBar`; None (default) reports nothing.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> total = meshstate.State(jnp.zeros(()))
    >>> def step(c, x):
    ...   total.value = total.value + x
    ...   return c * 2, total.value
    >>> c, ys = meshstate.transform.scan(step, 1., jnp.arange(4.))
    >>> float(c), ys.tolist(), float(total.value)
    (16.0, [0.0, 1.0, 3.0, 6.0], 6.0)
  """
  return _scan('scan', f, init, xs, length, reverse, unroll, pbar)


def _scan(where, f, init, xs, length, reverse, unroll, pbar):
  n = _length(where, xs, length)
  runner = progress_runner(pbar, n)
  carried = _carry.carry(
      where, lambda preset: [_carry.discover(lambda: f(init, _step(xs)), preset=preset)],
      loop=True)

  def body(c, x):
    i, c, vals = c
    (c, y), new = _carry.call(f, carried.states, vals, c, x, outputs=carried.states,
                              where=where)
    if runner is not None:
      runner.tick(i)
    return (i + 1, c, carried.fit(new)), y

  start = (jnp.int32(0), init, carried.values)
  (_, c, new), ys = lax.scan(body, start, xs, length=n, reverse=reverse, unroll=unroll)
  _carry.write_back(carried.states, new, where)
  return c, ys


def for_loop(f: Callable, *xs: Any, length: int | None = None, reverse: bool = False,
             unroll: int | bool = 1, pbar: Any = None) -> Any:
  """Call `f(*x)` for each slice `x` of `xs` along axis 0, carrying the `State`s it writes.

  Returns `f`'s outputs stacked along a new leading axis. With no `xs`, `length=` gives the
  number of steps and `f` takes no argument. `pbar` shows progress while the loop runs on the
  device: an int `N` reports every N steps, `True` about 20 times, or pass a `ProgressBar`
  (tqdm when installed, plain text otherwise).

  Args:
    f: the step, called as `f(*x)` with one slice of each of `xs`; it may read and write
      `State`s.
    *xs: the arrays (pytrees) to loop over along axis 0, all of the same length.
    length: the number of steps when there is no `xs` (else it must agree with them).
    reverse: loop from the last slice to the first.
    unroll: how many steps to unroll per loop iteration, as in `jax.lax.scan`.
    pbar: progress while the loop runs on the device: an int `N` reports every N steps,
      `True` about 20 times, or a `ProgressBar`; None (default) reports nothing.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> v = meshstate.HiddenState(jnp.zeros(2))
    >>> def step(i):
    ...   v.value = v.value * 0.5 + i
    ...   return v.value.sum()
    >>> meshstate.transform.for_loop(step, jnp.arange(3.)).tolist(), v.value.tolist()
    ([0.0, 2.0, 5.0], [2.5, 2.5])
  """
  _, ys = _scan('for_loop', lambda c, x: (c, f(*x)), (), xs, length, reverse, unroll, pbar)
  return ys


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any) -> Any:
  """`jax.lax.while_loop` that carries the `State`s `body_fun` writes.

  `cond_fun` may read states (also those the body writes) but must not write any.

  Args:
    cond_fun: `cond_fun(val) -> bool scalar`: whether to run the body again.
    body_fun: `body_fun(val) -> val`, with the same structure, shapes and dtypes; it may
      read and write `State`s.
    init_val: the initial value.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> n = meshstate.State(jnp.int32(0))
    >>> def body(x):
    ...   n.value = n.value + 1
    ...   return x * 2
    >>> out = meshstate.transform.while_loop(lambda x: x < 100, body, 1)
    >>> int(out), int(n.value)
    (128, 7)
  """
  carried = _carry.carry(
      'while_loop', lambda preset: [_carry.discover(body_fun, init_val, preset=preset)],
      loop=True)
  effects = _carry.discover(cond_fun, init_val, preset=dict(zip(carried.states, carried.values)))
  if effects.writes:
    raise ValueError(f'while_loop: cond_fun writes {", ".join(map(_carry.label, effects.writes))}'
                     f'; only body_fun may write states.')

  def test(c):
    val, vals = c
    out, _ = _carry.call(cond_fun, carried.states, vals, val, outputs=(), where='while_loop')
    return out

  def body(c):
    val, vals = c
    val, new = _carry.call(body_fun, carried.states, vals, val, outputs=carried.states,
                           where='while_loop')
    return val, carried.fit(new)

  val, new = lax.while_loop(test, body, (init_val, carried.values))
  _carry.write_back(carried.states, new, 'while_loop')
  return val


def switch(index: Any, branches: Sequence[Callable], *operands: Any) -> Any:
  """`jax.lax.switch` whose branches may write `State`s.

  A state written by some branches keeps its value on the others; all branches must agree on
  its shape and dtype.

  Args:
    index: an integer scalar choosing the branch (clamped to the valid range, as in
      `jax.lax.switch`).
    branches: the functions to choose from; each is called as `branch(*operands)`.
    *operands: the arguments passed to the chosen branch.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> a, b = meshstate.State(jnp.zeros(())), meshstate.State(jnp.zeros(()))
    >>> def inc_a(x):
    ...   a.value = a.value + x
    ...   return x
    >>> def inc_b(x):
    ...   b.value = b.value + x
    ...   return -x
    >>> float(meshstate.transform.switch(1, [inc_a, inc_b], 3.)), float(a.value), float(b.value)
    (-3.0, 0.0, 3.0)
  """
  branches = list(branches)
  if not branches or not all(map(callable, branches)):
    raise TypeError(f'switch needs a non-empty sequence of callables as branches, got '
                    f'{branches!r}.')
  return _branch('switch', lambda fns, ops: lax.switch(index, fns, *ops), branches, operands)


def cond(pred: Any, true_fun: Callable, false_fun: Callable, *operands: Any) -> Any:
  """`jax.lax.cond` whose branches may write `State`s (an unwritten one keeps its value).

  Args:
    pred: a boolean scalar choosing the branch.
    true_fun: called as `true_fun(*operands)` when `pred` is true.
    false_fun: called as `false_fun(*operands)` otherwise; it must return the same structure,
      shapes and dtypes.
    *operands: the arguments passed to the chosen branch.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> hits = meshstate.State(jnp.int32(0))
    >>> def hit(x):
    ...   hits.value = hits.value + 1
    ...   return x
    >>> [float(meshstate.transform.cond(x > 0, hit, lambda x: -x, x)) for x in (2., -1.)]
    [2.0, 1.0]
    >>> int(hits.value)
    1
  """
  return _branch('cond', lambda fns, ops: lax.cond(pred, fns[1], fns[0], *ops),
                 [false_fun, true_fun], operands)


def _branch(where: str, select: Callable, branches: list, operands: tuple) -> Any:
  carried = _carry.carry(
      where, lambda preset: [_carry.discover(b, *operands, preset=preset) for b in branches],
      loop=False)

  def pure(fun):
    def run(vals, *ops):
      out, new = _carry.call(fun, carried.states, vals, *ops, outputs=carried.states, where=where)
      return out, carried.fit(new)
    return run

  out, new = select([pure(b) for b in branches], (carried.values, *operands))
  _carry.write_back(carried.states, new, where)
  return out


@overload
def checkpoint(fun: Callable[..., Any], prevent_cse: bool = True,
               policy: Callable[..., Any] | None = None,
               static_argnums: int | Sequence[int] = ()) -> Callable[..., Any]: ...
@overload
def checkpoint(fun: None = None, prevent_cse: bool = True,
               policy: Callable[..., Any] | None = None,
               static_argnums: int | Sequence[int] = ()
               ) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...
def checkpoint(fun: Callable[..., Any] | None = None, prevent_cse: bool = True,
               policy: Callable[..., Any] | None = None, static_argnums: int | Sequence[int] = ()
               ) -> Callable[..., Any]:
  """`jax.checkpoint` (rematerialisation) of a function that reads and writes `State`s.

  States read are inputs of the checkpointed function, so gradients flow to them; states
  written come out of it. Without `fun`, returns a decorator.

  Args:
    fun: the function whose intermediate values are recomputed in the backward pass.
    prevent_cse: as in `jax.checkpoint`: keep XLA from merging the recomputation away.
    policy: a `jax.checkpoint_policies` policy choosing what may be saved instead.
    static_argnums: positional arguments passed to `fun` as Python values.

  Example:
    >>> import jax, jax.numpy as jnp, meshstate
    >>> w = meshstate.ParamState(jnp.array(3.))
    >>> layer = meshstate.transform.checkpoint(lambda x: jnp.sin(w.value * x))
    >>> g = meshstate.transform.grad(lambda x: layer(x), grad_states=w)(2.)
    >>> bool(jnp.allclose(g, 2 * jnp.cos(6.)))
    True
  """
  statics = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
  if fun is None:
    return functools.partial(checkpoint, prevent_cse=prevent_cse, policy=policy,
                             static_argnums=statics)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    for i in statics:
      if not -len(args) <= i < len(args):
        raise ValueError(f'checkpoint: static_argnums contains {i}, but the function was called '
                         f'with {len(args)} positional arguments.')
    fixed = {i % len(args): args[i] for i in statics}
    dynamic = [a for i, a in enumerate(args) if i not in fixed]

    def bound(*dyn):
      rest = iter(dyn)
      return fun(*(fixed[i] if i in fixed else next(rest) for i in range(len(args))), **kwargs)

    effects = _carry.discover(bound, *dynamic)
    inputs = [s for s in effects.reads if _carry.holds_arrays(s.value)]

    def pure(vals, dyn):
      return _carry.call(bound, inputs, vals, *dyn, outputs=effects.writes, where='checkpoint')

    out, new = jax.checkpoint(pure, prevent_cse=prevent_cse, policy=policy)(
        _carry.read(inputs), dynamic)
    _carry.write_back(effects.writes, new, 'checkpoint')
    return out

  return wrapped


remat = checkpoint
