"""One trace per signature: the discovery jaxpr, its state reads lifted to inputs, is the program.

During discovery the first read of a state binds `read_p`, a primitive without operands whose
result stands for the state's slot (one equation per leaf of its value). When every such equation
lands in the top-level jaxpr, they become the jaxpr's extra inputs, and the program evaluates that
jaxpr on the real slots: the user's Python body runs once per call signature. (Under
`shard_map(check_vma=True)` the probe is traced inside the shard_map body, and the slots are
typed like the views, varying axes included.) A state first read inside a `scan`/`cond`/`jit`
body, or by a nested meshstate call, is still read at the top level: a frame makes its views at
its own trace level (`Frame.read`), and the inner body closes over them. Lanes are typed by
the Explicit mesh axes that stay in a `shard_map` or `vmap` body (`lane_sharding`). A value
whose type in the program discovery cannot know leaves the reader unusable (the mapper says
which values: `Mapper.unliftable`): the engine then traces the body a second time to build the
program. A call inside `jit` or a loop is lifted too: its slots are that trace's values, and so
is a `pmap2`/`shard_map` nested in another's body, whose discovery runs on that body's mesh.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.extend.core import ClosedJaxpr, Primitive, Var, jaxpr_as_fun

from meshstate._compat import ShapedArray
from meshstate.transform._discover import Discovery, explicitly_typed, lane_key, lane_sharding

__all__ = ['read_p', 'Reader', 'never_blocks']

read_p = Primitive('meshstate_read')
# `axes`: the mapped axes the slot varies over (read by `_varying.py`); `slot`: (state, leaf).
read_p.def_abstract_eval(lambda *, aval, slot, axes: aval)


def _no_eager(*_, **params):
  raise RuntimeError(f'meshstate_read{params.get("slot")} ran outside a trace: it only marks a '
                     f'state read during discovery.')


read_p.def_impl(_no_eager)


def never_blocks(_: Any) -> bool:
  """No value keeps the trace from lifting (`Mapper.unliftable`): discovery types it as the
  program does."""
  return False


class Reader:
  """Hands out the discovery view of each state read, and builds the program from the trace."""

  def __init__(self, blocks: Callable[[Any], bool] = explicitly_typed):
    self.states: list = []          # states read, in first-read order
    self.leaves: list[int] = []     # leaves of each one's value
    self.blocks = blocks            # whether a value read keeps the trace from lifting
    self.usable = True

  def read(self, state: Any, base: Any, shape: Callable[[tuple], tuple] | None = None,
           axes: frozenset = frozenset(), drop: int | None = None) -> Any:
    """The view of `state` (value `base`): leaves of the lane shape `shape(leaf shape)` (the
    leaf's own shape without `shape`; dimension `drop` mapped away), typed as a lane is in a
    `shard_map` body on the current abstract mesh (`lane_sharding`), varying over `axes`."""
    lane = shape or (lambda s: s)
    return self._slots(state, base, lambda a: ShapedArray(
        lane(a.shape), a.dtype, weak_type=a.weak_type, sharding=lane_sharding(a, drop)), axes)

  def read_like(self, state: Any, like: Any) -> Any:
    """The view of `state` as slots typed like the leaves of `like` (varying axes included)."""
    return self._slots(state, like, lambda a: a, frozenset())

  def _slots(self, state: Any, value: Any, aval: Callable[[Any], Any], axes: frozenset) -> Any:
    leaves, tree = jax.tree.flatten(value)
    if any(map(self.blocks, leaves)):
      self.usable = False
    k = len(self.states)
    self.states.append(state)
    self.leaves.append(len(leaves))
    return tree.unflatten([read_p.bind(aval=aval(jax.typeof(x)), slot=(k, i), axes=axes)
                           for i, x in enumerate(leaves)])

  def program(self, disc: Discovery, n_args: int, out_states: Sequence[Any],
              random_in: Sequence[Any], names: Any) -> Callable | None:
    """The program over lane slots (arguments, then states read), or None if it cannot be lifted.

    Random states read advance their global key once per call, as in the body's view.
    """
    closed = disc.jaxpr
    if not self.usable or closed is None or self.states != disc.reads:
      return None
    jaxpr = closed.jaxpr
    reads = {e.params['slot']: e for e in jaxpr.eqns if e.primitive is read_p}
    if len(reads) != sum(self.leaves) or len(jaxpr.invars) != n_args:
      return None   # a read left inside a sub-jaxpr, or a repeated one
    slots = [reads[(k, i)].outvars[0] for k, n in enumerate(self.leaves) for i in range(n)]
    lifted = jaxpr.replace(invars=[*jaxpr.invars, *slots],
                           eqns=[e for e in jaxpr.eqns if e.primitive is not read_p])
    run = jaxpr_as_fun(_dce(ClosedJaxpr(lifted, closed.consts)))
    result_tree, writes = disc.result_tree, disc.writes
    randoms = [self.states.index(s) for s in random_in]

    def program(*slots):
      outs = run(*slots[:n_args], *jax.tree.leaves(slots[n_args:]))
      out_leaves, written = result_tree.unflatten(outs)
      new = dict(zip(writes, written))
      new.update((self.states[k], lane_key(slots[n_args + k], names)[0]) for k in randoms)
      return (*out_leaves, *(new[s] for s in out_states))
    return program


def _dce(closed: ClosedJaxpr) -> ClosedJaxpr:
  """`closed` without the equations and constants no output needs (effects are kept).

  What discovery computed only to type a view (a placeholder's slice of a state, say) is dead
  once the reads are inputs; dropping it also lets go of the constants it held.
  """
  jaxpr = closed.jaxpr
  live = {v for v in jaxpr.outvars if isinstance(v, Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in live for v in eqn.outvars):
      kept.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, Var))
  consts = [(v, c) for v, c in zip(jaxpr.constvars, closed.consts) if v in live]
  return ClosedJaxpr(jaxpr.replace(eqns=kept[::-1], constvars=[v for v, _ in consts]),
                     [c for _, c in consts])
