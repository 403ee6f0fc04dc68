"""A model's states as a pytree of arrays keyed by path, and back: for checkpoints.

The names and their meaning follow flax nnx's functional API: `state(node, *filters)` reads
the values, `update(node, tree)` writes them back in place, `split(node, *filters)` gives a
`GraphDef` (the node's structure without values) and the value trees, and
`merge(graphdef, tree)` builds a new, independent node from them. A *node* is a
`meshstate.nn.Module` or a dict, list or tuple holding states (nested to any depth); a *tree*
is a nested dict keyed by the path elements of `Module.states()` (attribute names, dict keys,
list indices) whose leaves are the states' values as they are (sharded `jax.Array`s stay
sharded; a pytree-valued state such as an optimizer state stays one subtree). Filters are
those of `meshstate.util.filter` (a `State` subclass, a path element name, a filter), plus
`...` for "everything else", as in nnx.

Why these names: brainstate, whose API meshstate mirrors, has the same operations in
`brainstate.graph` as `treefy_split`, `treefy_merge`, `treefy_states` and `update_states`, all
derived from nnx; meshstate uses nnx's shorter, better-known names. One difference from nnx:
the trees are plain nested dicts of the values (what `nnx.State.to_pure_dict()` gives), not
containers of variable objects, so orbax and `jax.tree` see nothing but arrays.

`abstract(tree)` replaces every array by a `jax.ShapeDtypeStruct` with its `.sharding`, which
is what orbax-checkpoint needs to restore a checkpoint straight onto the mesh:

  >>> import orbax.checkpoint as ocp                                     # doctest: +SKIP
  >>> ckpt = ocp.StandardCheckpointer()                                  # doctest: +SKIP
  >>> ckpt.save(path, meshstate.graph.state(model))                      # doctest: +SKIP
  >>> ckpt.wait_until_finished()                                         # doctest: +SKIP
  >>> restored = ckpt.restore(path, meshstate.graph.abstract(model))     # doctest: +SKIP
  >>> meshstate.graph.update(model, restored)                            # doctest: +SKIP

Example:
  >>> import jax.numpy as jnp, meshstate
  >>> states = {'w': meshstate.ParamState(jnp.ones(2)), 'n': meshstate.LongTermState(0.0)}
  >>> tree = meshstate.graph.state(states, meshstate.ParamState)
  >>> meshstate.graph.update(states, {'w': tree['w'] * 3})
  >>> states['w'].value.tolist()
  [3.0, 3.0]
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import numpy as np

from meshstate._state import State, frames
from meshstate.nn._module import Module, _walk
from meshstate.util.filter import Everything, to_predicate

__all__ = ['GraphDef', 'split', 'merge', 'state', 'update', 'abstract']

Path = tuple


def _states(node: Any, where: str) -> dict[Path, State]:
  """Every state below `node` by path (each state once, under its first path)."""
  if isinstance(node, Module):
    return node.states()
  if isinstance(node, (dict, list, tuple)):
    return dict(_walk(node, (), {id(node)}))
  hint = " (wrap it in a dict: {'name': state})" if isinstance(node, State) else ''
  raise TypeError(f'meshstate.graph.{where} takes a Module or a dict, list or tuple of States, '
                  f'got {type(node).__name__}{hint}.')


def _predicate(selector: Any) -> Any:
  return Everything() if selector is Ellipsis else to_predicate(selector)


def _group(found: dict[Path, State], filters: tuple) -> list[dict[Path, State]]:
  """The states each filter selects; a state goes to the first filter that matches it."""
  predicates = [_predicate(f) for f in filters]
  groups: list[dict[Path, State]] = [{} for _ in predicates]
  for path, s in found.items():
    for group, predicate in zip(groups, predicates):
      if predicate(path, s):
        group[path] = s
        break
  return groups


def _nest(flat: dict[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _text(path: Path) -> str:
  return '.'.join(map(str, path))


def _flatten(tree: Any, paths: Any, where: str) -> dict[Path, Any]:
  """`{path: value}` for the states of `paths` that `tree` holds; unknown paths are errors."""
  prefixes = {p[:i] for p in paths for i in range(len(p))}
  found: dict[Path, Any] = {}

  def walk(node: Any, prefix: Path) -> None:
    if not isinstance(node, dict):
      raise TypeError(f'meshstate.graph.{where}: expected a dict of values at '
                      f'{_text(prefix) or "the top"}, got {type(node).__name__}.')
    for key, value in node.items():
      path = prefix + (key,)
      if path in paths:
        if isinstance(value, State):
          raise TypeError(f'meshstate.graph.{where}: the value at {_text(path)!r} is a '
                          f'{type(value).__name__}; the tree holds values, not States.')
        found[path] = value
      elif path in prefixes:
        walk(value, path)
      else:
        known = ', '.join(sorted(map(_text, paths))) or 'none'
        raise ValueError(f'meshstate.graph.{where}: there is no state at {_text(path)!r} '
                         f'(the states: {known}).')

  walk(tree, ())
  return found


def _abstract_leaf(x: Any) -> Any:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def _with_value(template: State, value: Any) -> State:
  """A new state like `template` (same class and attributes) holding `value`."""
  new = copy.copy(template)
  new._value = value
  stack = frames()
  if stack:   # created inside a transform: local to it, as `State.__init__` records
    stack[-1].created.add(id(new))
  return new


def _copy_graph(obj: Any, memo: dict[int, Any]) -> Any:
  """A copy of the modules and containers below `obj` (what `Module.states` walks), with the
  states `memo` maps replaced; any other attribute is shared, as nnx shares static ones."""
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, Module):
    new = copy.copy(obj)
    memo[id(obj)] = new
    vars(new).update({k: _copy_graph(v, memo) for k, v in vars(obj).items()})
  elif isinstance(obj, (dict, list)):
    new = copy.copy(obj)
    memo[id(obj)] = new
    for k, v in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
      new[k] = _copy_graph(v, memo)
  elif isinstance(obj, tuple):
    items = [_copy_graph(v, memo) for v in obj]
    new = type(obj)(*items) if hasattr(obj, '_fields') else type(obj)(items)
    memo[id(obj)] = new
  else:
    return obj
  return new


@dataclasses.dataclass(frozen=True, eq=False)
class GraphDef:
  """The structure of a node without its values: what `merge` needs besides the value trees.

  It holds a copy of the node's modules and containers whose states hold only
  `jax.ShapeDtypeStruct`s; `merge` copies those again with new states, so every node it
  builds has its own states, modules and containers. Other attributes (numbers, strings,
  functions, ...) are shared with the original, as nnx shares a graph's static attributes.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> graphdef, tree = meshstate.graph.split([meshstate.State(jnp.zeros(2))])
    >>> graphdef
    GraphDef(list, paths=('0',))
  """
  template: Any
  slots: dict   # path -> the state in `template` that holds that path's value

  @property
  def paths(self) -> tuple[Path, ...]:
    """The paths of the node's states, in order."""
    return tuple(self.slots)

  def __repr__(self) -> str:
    return f'GraphDef({type(self.template).__name__}, paths={tuple(map(_text, self.slots))!r})'


def state(node: Any, *filters: Any) -> Any:
  """The values of `node`'s states as a nested dict keyed by path (like `nnx.state`).

  With no filter, every state; with one, the states it selects; with several, a tuple of
  trees, each state in the first whose filter selects it (states no filter selects are left
  out). Values are read as they are: a sharded array stays sharded, on its devices.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> class Net(meshstate.nn.Module):
    ...   def __init__(self):
    ...     super().__init__()
    ...     self.layers = [meshstate.ParamState(jnp.ones(2))]
    ...     self.count = meshstate.LongTermState(jnp.zeros((), jnp.int32))
    >>> params, rest = meshstate.graph.state(Net(), meshstate.ParamState, ...)
    >>> params, rest
    ({'layers': {0: Array([1., 1.], dtype=float32)}}, {'count': Array(0, dtype=int32)})
  """
  groups = _group(_states(node, 'state'), filters or (Everything(),))
  trees = tuple(_nest({p: s.value for p, s in g.items()}) for g in groups)
  return trees if len(filters) > 1 else trees[0]


def update(node: Any, tree: Any, *trees: Any) -> None:
  """Write the values of one or more trees (as `state` makes them) into `node`'s states.

  Like `nnx.update`, in place: states the trees leave out keep their values. A path that
  names no state of `node` is a `ValueError`, and then no state is changed.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> states = {'a': meshstate.State(jnp.zeros(2)), 'b': meshstate.State(jnp.zeros(2))}
    >>> meshstate.graph.update(states, {'a': jnp.ones(2)})
    >>> states['a'].value.tolist(), states['b'].value.tolist()
    ([1.0, 1.0], [0.0, 0.0])
  """
  found = _states(node, 'update')
  values: dict[Path, Any] = {}
  for t in (tree, *trees):
    values.update(_flatten(t, found, 'update'))
  saved = {path: found[path]._value for path in values}
  try:
    for path, value in values.items():
      found[path].value = value
  except BaseException:
    for path, value in saved.items():
      found[path]._value = value
    raise


def split(node: Any, *filters: Any) -> tuple:
  """`(graphdef, tree, ...)`: the node's structure and its values (like `nnx.split`).

  With no filter, one tree of every state; with filters, one tree per filter, each state in
  the first whose filter selects it. Every state must land in a tree (end with `...` to
  catch the rest); otherwise it is a `ValueError` naming the states left over.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> net = {'w': meshstate.ParamState(jnp.ones(2)), 'n': meshstate.LongTermState(1)}
    >>> graphdef, params, rest = meshstate.graph.split(net, meshstate.ParamState, ...)
    >>> sorted(params), sorted(rest)
    (['w'], ['n'])
  """
  found = _states(node, 'split')
  groups = _group(found, filters or (Everything(),))
  left = [p for p in found if not any(p in g for g in groups)]
  if left:
    raise ValueError(f'meshstate.graph.split: no filter selects the states '
                     f'{", ".join(map(_text, left))}; add `...` as the last filter to keep them.')
  placeholders = {path: _with_value(s, jax.tree.map(_abstract_leaf, s._value))
                  for path, s in found.items()}
  memo = {id(found[path]): p for path, p in placeholders.items()}
  graphdef = GraphDef(_copy_graph(node, memo), placeholders)
  return (graphdef, *(_nest({p: s.value for p, s in g.items()}) for g in groups))


def merge(graphdef: GraphDef, tree: Any, *trees: Any) -> Any:
  """A new node with `graphdef`'s structure whose states hold the trees' values (`nnx.merge`).

  Every state of the graphdef needs a value; the trees together must give each one.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> net = {'w': meshstate.ParamState(jnp.ones(2))}
    >>> graphdef, tree = meshstate.graph.split(net)
    >>> clone = meshstate.graph.merge(graphdef, {'w': tree['w'] + 1})
    >>> type(clone['w']).__name__, clone['w'].value.tolist(), net['w'].value.tolist()
    ('ParamState', [2.0, 2.0], [1.0, 1.0])
  """
  if not isinstance(graphdef, GraphDef):
    raise TypeError(f'meshstate.graph.merge takes the GraphDef that split returned first, got '
                    f'{type(graphdef).__name__}.')
  values: dict[Path, Any] = {}
  for t in (tree, *trees):
    values.update(_flatten(t, graphdef.slots, 'merge'))
  missing = [p for p in graphdef.slots if p not in values]
  if missing:
    raise ValueError(f'meshstate.graph.merge: no value for the states '
                     f'{", ".join(map(_text, missing))}.')
  memo = {id(s): _with_value(s, values[p]) for p, s in graphdef.slots.items()}
  return _copy_graph(graphdef.template, memo)


def abstract(tree: Any) -> Any:
  """`tree` with every array replaced by a `jax.ShapeDtypeStruct` that keeps its `.sharding`.

  `tree` is a tree as `state` makes it, or a node (then `state(node)` is used). The result
  is the target orbax-checkpoint restores onto: each array comes back with that sharding,
  straight onto its devices. Values that are not arrays are kept as they are.

  Example:
    >>> import jax.numpy as jnp, meshstate
    >>> meshstate.graph.abstract({'w': meshstate.ParamState(jnp.ones((2, 3)))})['w'].shape
    (2, 3)
  """
  if isinstance(tree, Module) or any(isinstance(x, State) for x in jax.tree.leaves(tree)):
    tree = state(tree)
  return jax.tree.map(_abstract_leaf, tree)
