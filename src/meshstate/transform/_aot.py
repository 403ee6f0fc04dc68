"""Ahead-of-time lowering and compilation of a stateful mapping, in the user's own terms.

`mapping.lower(*args)` gives a `Lowered` whose `compile()` is a `Compiled` called with the
user's arguments: it reads the states the program reads, writes back the ones it writes, and
returns the user's output structure. `as_text()`, `cost_analysis()` and `args_info` are JAX's,
with `args_info` in the user's argument structure.
"""
from __future__ import annotations

from typing import Any

import jax

from meshstate._state import traced_write_error
from meshstate.transform._plan import Plan

__all__ = ['Lowered', 'Compiled']


def _args_info(plan: Plan, info: Any) -> Any:
  """JAX's per-slot `args_info` as `(args, kwargs)` of the user's call (states left out)."""
  slots = info[0] if isinstance(info, tuple) and len(info) == 2 else info
  return plan.treedef.unflatten(list(slots)[:plan.n_leaves])


class Lowered:
  """A mapping lowered for one call signature (see `StatefulMapping.lower`)."""

  def __init__(self, mapping: Any, plan: Plan, lowered: Any, signature: tuple):
    self._mapping, self._plan, self._lowered, self._signature = mapping, plan, lowered, signature

  def as_text(self, *args: Any, **kwargs: Any) -> str:
    return self._lowered.as_text(*args, **kwargs)

  def cost_analysis(self) -> Any:
    return self._lowered.cost_analysis()

  @property
  def args_info(self) -> Any:
    return _args_info(self._plan, self._lowered.args_info)

  def compile(self) -> 'Compiled':
    return Compiled(self._mapping, self._plan, self._lowered.compile(), self._signature)


class Compiled:
  """A compiled mapping: call it with the user's arguments; it reads and writes the states."""

  def __init__(self, mapping: Any, plan: Plan, compiled: Any, signature: tuple):
    self._mapping, self._plan, self._compiled, self._signature = (mapping, plan, compiled,
                                                                 signature)

  def as_text(self) -> str:
    return self._compiled.as_text()

  def cost_analysis(self) -> Any:
    return self._compiled.cost_analysis()

  def memory_analysis(self) -> Any:
    return self._compiled.memory_analysis()

  @property
  def args_info(self) -> Any:
    return _args_info(self._plan, self._compiled.args_info)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    plan = self._plan
    key, leaves, treedef, *_ = self._mapping._signature(args, kwargs)
    if treedef != plan.treedef or key[2] != self._signature[2] or [
        (a.shape, a.dtype) for a in key[1]] != [(a.shape, a.dtype) for a in self._signature[1]]:
      raise TypeError(f'{self._mapping.name} was compiled for arguments '
                      f'{plan.treedef.unflatten(self._signature[1])}, but is called with '
                      f'{treedef.unflatten(key[1])}; lower it again for these.')
    outs = self._compiled(*leaves, *[s.value for s in plan.in_states])
    new = outs[plan.n_out:]
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(new)):  # pyright: ignore[reportAttributeAccessIssue]
      raise traced_write_error(f'{self._mapping.name} (compiled) was called', new)
    for state, value in (*zip(plan.out_states, new), *plan.static_writes):
      state.value = value
    return plan.out_tree.unflatten(outs[:plan.n_out])
