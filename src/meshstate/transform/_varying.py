"""Which values of a traced program differ across mapped axes, read from its jaxpr.

`jax.pmap` (and `shard_map(check_vma=False)`) do not type values as varying or not, so meshstate
reads it off the program: a mapped input and `axis_index` vary over their axis; a reduction over
an axis (`psum`, `pmax`, `all_gather`, ... without `axis_index_groups`) makes a value the same on
every member of that axis; every other equation varies wherever one of its inputs does. Control
flow and nested calls are followed into their jaxprs; an unknown higher-order primitive is taken
to vary over every tracked axis, so an answer is never "the same" by mistake.
"""
from __future__ import annotations

from typing import Any, Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from meshstate._compat import scan_counts

__all__ = ['varying_axes']

# Collectives whose result is the same across the axes they reduce over (without groups).
_REDUCING = frozenset({'psum', 'pmax', 'pmin', 'pmean', 'all_gather', 'all_gather_invariant',
                       'psum_invariant'})
# Primitives that only retype a value: what it varies over does not change.
_RETYPING = frozenset({'pvary', 'pbroadcast', 'pcast'})

Axes = frozenset


def varying_axes(jaxpr: ClosedJaxpr | Jaxpr, in_axes: Sequence[Axes], tracked: Axes) -> list[Axes]:
  """For each output of `jaxpr`, the axes of `tracked` it varies over, given its inputs'."""
  jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
  env: dict[Any, Axes] = dict(zip(jaxpr.invars, in_axes))
  read = lambda v: Axes() if isinstance(v, Literal) else env.get(v, Axes())  # noqa: E731
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    outs = _equation(eqn, ins, tracked)
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _union(sets: Sequence[Axes]) -> Axes:
  return Axes().union(*sets)


def _named(params: dict, tracked: Axes) -> Axes:
  """The tracked axes a collective's `axes`/`axis_name` parameter names."""
  names = params.get('axes', params.get('axis_name', ()))
  names = names if isinstance(names, (tuple, list, frozenset, set)) else (names,)
  return Axes(n for n in names if n in tracked)


def _equation(eqn, ins: list[Axes], tracked: Axes) -> list[Axes]:
  name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
  union = _union(ins)
  if name == 'meshstate_read':   # a state's slot (`_lift.py`): varies as its layout says
    return [Axes(params['axes']) & tracked] * n_out
  if name == 'axis_index':
    return [union | _named(params, tracked)] * n_out
  named = _named(params, tracked) if name not in ('scan', 'while', 'cond') else Axes()
  if named:
    if name in _RETYPING:
      return [union] * n_out
    if name in _REDUCING and params.get('axis_index_groups') is None:
      return [i - named for i in ins] if len(ins) == n_out else [union - named] * n_out
    return [union | named] * n_out   # permutes, scatters or groups: differs across the axis
  if name == 'scan':
    return _scan(params, ins, tracked)
  if name == 'while':
    return _while(params, ins, tracked)
  if name == 'cond':
    branches = [varying_axes(b, ins[1:], tracked) for b in params['branches']]
    return [_union(outs) | ins[0] for outs in zip(*branches)]
  subs = [v for v in params.values() if isinstance(v, (Jaxpr, ClosedJaxpr))]
  if len(subs) == 1:
    inner = subs[0].jaxpr if isinstance(subs[0], ClosedJaxpr) else subs[0]
    if len(inner.invars) == len(ins) and len(inner.outvars) == n_out:
      return varying_axes(subs[0], ins, tracked)   # jit, remat, custom_jvp/vjp, shard_map
  if subs or any(isinstance(v, tuple) and any(isinstance(b, (Jaxpr, ClosedJaxpr)) for b in v)
                 for v in params.values()):
    return [tracked] * n_out
  return [union] * n_out


def _scan(params: dict, ins: list[Axes], tracked: Axes) -> list[Axes]:
  n_consts, n_carry = scan_counts(params)
  consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
  while True:   # carries only ever gain axes, so this ends after at most len(tracked) rounds
    outs = varying_axes(params['jaxpr'], [*consts, *carry, *xs], tracked)
    new = [c | o for c, o in zip(carry, outs[:n_carry])]
    if new == carry:
      return [*carry, *outs[n_carry:]]
    carry = new


def _while(params: dict, ins: list[Axes], tracked: Axes) -> list[Axes]:
  nc, nb = params['cond_nconsts'], params['body_nconsts']
  cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
  while True:
    # A predicate that differs across an axis makes trip counts, hence every carry, differ.
    pred = varying_axes(params['cond_jaxpr'], [*cond_consts, *carry], tracked)[0]
    outs = varying_axes(params['body_jaxpr'], [*body_consts, *carry], tracked)
    new = [c | o | pred for c, o in zip(carry, outs)]
    if new == carry:
      return carry
    carry = new
