"""Every public parameter of every public callable is named in an `Args:` section of its docstring.

The API reference (mkdocstrings, Google style) renders these sections; a parameter missing here
is a parameter a user cannot look up. Callables are read from each public module's `__all__`;
for a class, its `__init__` parameters belong in the class docstring (or `__init__`'s), and each
public method defined in meshstate needs its own entries.
"""
from __future__ import annotations

import inspect
import re
import types

import pytest

import meshstate

MODULES = ['meshstate', 'meshstate.transform', 'meshstate.random', 'meshstate.sharding',
           'meshstate.nn', 'meshstate.util.filter', 'meshstate.multihost']
SECTION = re.compile(r'^(\s*)Args:\s*$')
ENTRY = re.compile(r'^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:')


def args_section(doc: str | None) -> list[str]:
  """The parameter names an `Args:` section of `doc` documents (stars kept)."""
  lines = (doc or '').splitlines()
  names = []
  for i, line in enumerate(lines):
    head = SECTION.match(line)
    if not head:
      continue
    base, entry_indent = len(head.group(1)), None
    for body in lines[i + 1:]:
      if not body.strip():
        continue
      indent = len(body) - len(body.lstrip())
      if indent <= base:
        break
      if entry_indent is None:
        entry_indent = indent
      if indent == entry_indent:
        match = ENTRY.match(body.strip())
        assert match, f'unparsable Args entry {body.strip()!r}'
        names.append(match.group(1))
  return names


def own(obj) -> bool:
  return (getattr(obj, '__module__', '') or '').startswith('meshstate')


def params(fun) -> list[str]:
  """Public parameter names, `*args`/`**kwargs` written with their stars."""
  out = []
  for p in inspect.signature(fun).parameters.values():
    if p.name in ('self', 'cls'):
      continue
    star = {p.VAR_POSITIONAL: '*', p.VAR_KEYWORD: '**'}.get(p.kind, '')
    out.append(star + p.name)
  return out


def callables():
  """`(qualified name, object whose parameters count, docstrings that may document them)`."""
  import importlib
  seen = set()
  for modname in MODULES:
    module = importlib.import_module(modname)
    for name in module.__all__:
      obj = getattr(module, name)
      if isinstance(obj, types.ModuleType) or not callable(obj) or id(obj) in seen:
        continue
      seen.add(id(obj))
      where = f'{modname}.{name}'
      if inspect.isclass(obj):
        if issubclass(obj, BaseException) or not own(obj):
          continue
        init = obj.__init__
        if own(init) and init is not object.__init__:
          yield where, init, [obj.__doc__, init.__doc__]
        for klass in obj.__mro__:
          if not own(klass):
            continue
          for attr, member in vars(klass).items():
            if attr.startswith('_') or not inspect.isfunction(member):
              continue
            method = getattr(obj, attr)
            key = (id(obj), attr)
            if key not in seen:
              seen.add(key)
              yield f'{where}.{attr}', method, [method.__doc__]
      elif own(obj):
        yield where, obj, [obj.__doc__]


CALLABLES = list(callables())


def test_the_check_reads_google_style_sections():
  doc = 'Do it.\n\n  Args:\n    fun: the function.\n      More text.\n    *args (int): more.\n' \
        '\n  Example:\n    >>> 1\n'
  assert args_section(doc) == ['fun', '*args']
  assert len(CALLABLES) > 60


@pytest.mark.parametrize('where, fun, docs', CALLABLES, ids=[c[0] for c in CALLABLES])
def test_every_public_parameter_has_an_args_entry(where, fun, docs):
  documented = [n for doc in docs for n in args_section(doc)]
  missing = [p for p in params(fun) if p not in documented and p.lstrip('*') not in documented]
  assert not missing, f'{where}: no Args entry for {missing}'
  names = {p.lstrip('*') for p in params(fun)}
  extra = [n for n in documented if n.lstrip('*') not in names]
  assert not extra, f'{where}: Args documents {extra}, which it does not take'


def test_unexpected_out_state_mapping_documents_each_policy():
  doc = meshstate.transform.StatefulMapping.__doc__
  for policy in ("'auto'", "'warn'", "'ignore'", "'raise'"):
    assert policy in doc, policy
  for front in (meshstate.transform.pmap2, meshstate.transform.vmap2):
    assert 'unexpected_out_state_mapping' in args_section(front.__doc__)
