import jax.numpy as jnp
import pytest

import meshstate
from meshstate import HiddenState, LongTermState, ParamState, ShortTermState, State
from meshstate.util import filter as F
from meshstate.util.filter import (All, Any, Everything, Not, Nothing, OfType, PathContains,
                                   to_predicate)


@pytest.fixture
def param():
  return ParamState(jnp.zeros(2))


@pytest.fixture
def short():
  return ShortTermState(jnp.zeros(2))


def test_util_exports_filter_module():
  assert meshstate.util.filter is F
  for name in ['OfType', 'Any', 'All', 'Not', 'Everything', 'Nothing', 'PathContains',
               'to_predicate']:
    assert name in F.__all__
    assert hasattr(F, name)


def test_of_type(param, short):
  f = OfType(ParamState)
  assert f(('w',), param) is True
  assert f(('w',), short) is False
  assert OfType(State)(('w',), short) is True  # subclasses match
  both = OfType((ParamState, ShortTermState))
  assert both((), param) and both((), short)
  assert not both((), LongTermState(0))


def test_of_type_rejects_non_class():
  with pytest.raises(TypeError, match='OfType'):
    OfType('ParamState')


def test_path_contains_matches_whole_elements(param):
  f = PathContains('w')
  assert f(('layers', 0, 'w'), param)
  assert f(('w',), param)
  assert not f(('weight',), param)  # not a substring match
  assert not f((), param)
  index = PathContains(0)
  assert index(('layers', 0, 'w'), param)
  assert not index(('layers', 1, 'w'), param)
  assert not PathContains(1)(('flags', True), param)  # True == 1 but is not the index 1


def test_everything_nothing(param):
  assert Everything()(('a',), param) is True
  assert Everything()((), param) is True
  assert Nothing()(('a',), param) is False
  assert Nothing()((), param) is False


def test_any(param, short):
  f = Any(OfType(ParamState), PathContains('b'))
  assert f(('w',), param)
  assert f(('b',), short)
  assert not f(('w',), short)
  assert not Any()(('w',), param)


def test_all(param, short):
  f = All(OfType(ParamState), PathContains('w'))
  assert f(('w',), param)
  assert not f(('b',), param)
  assert not f(('w',), short)
  assert All()(('w',), param)


def test_not(param, short):
  f = Not(OfType(ParamState))
  assert not f((), param)
  assert f((), short)
  assert Not(Nothing())((), param)
  assert not Not(Everything())((), param)


def test_composition(param, short):
  f = All(OfType(ParamState), Not(PathContains('b')))
  assert f(('fc', 'w'), param)
  assert not f(('fc', 'b'), param)
  assert not f(('fc', 'w'), short)
  g = Any(f, All(OfType(ShortTermState), PathContains('b')))
  assert g(('fc', 'w'), param)
  assert g(('fc', 'b'), short)
  assert not g(('fc', 'b'), param)
  assert not g(('fc', 'w'), short)


def test_operators(param, short):
  assert (OfType(ParamState) & PathContains('w')) == All(OfType(ParamState), PathContains('w'))
  assert (OfType(ParamState) | PathContains('w')) == Any(OfType(ParamState), PathContains('w'))
  assert ~OfType(ParamState) == Not(OfType(ParamState))
  assert (~OfType(ParamState))((), short)


def test_reprs():
  assert repr(OfType(ParamState)) == "OfType(<class 'meshstate.ParamState'>)"
  assert repr(Not(OfType(ParamState))) == "Not(OfType(<class 'meshstate.ParamState'>))"
  assert (repr(Any(OfType(ParamState), PathContains('w')))
          == "Any(OfType(<class 'meshstate.ParamState'>), PathContains('w'))")
  assert (repr(All(OfType(HiddenState), Not(PathContains('b'))))
          == "All(OfType(<class 'meshstate.HiddenState'>), Not(PathContains('b')))")
  assert repr(Everything()) == 'Everything()'
  assert repr(Nothing()) == 'Nothing()'
  assert repr(PathContains(0)) == 'PathContains(0)'
  assert repr({0: OfType(ParamState)}) == "{0: OfType(<class 'meshstate.ParamState'>)}"


def test_module_names():
  for cls in [OfType, Any, All, Not, Everything, Nothing, PathContains]:
    assert cls.__module__ == 'meshstate.util.filter'


def test_equality_and_hashing():
  assert OfType(ParamState) == OfType(ParamState)
  assert OfType(ParamState) != OfType(ShortTermState)
  assert OfType(ParamState) != PathContains('w')
  assert PathContains('w') == PathContains('w')
  assert PathContains('w') != PathContains('b')
  assert PathContains(1) != PathContains(True)
  assert Everything() == Everything() and Nothing() == Nothing()
  assert Everything() != Nothing()
  assert Not(OfType(ParamState)) == Not(OfType(ParamState))
  assert Any(OfType(ParamState), PathContains('w')) == Any(OfType(ParamState), PathContains('w'))
  assert Any(OfType(ParamState), PathContains('w')) != All(OfType(ParamState), PathContains('w'))
  assert Any(PathContains('a')) != Any(PathContains('b'))
  table = {OfType(ParamState): 0, Not(PathContains('b')): 1, Everything(): 2}
  assert table[OfType(ParamState)] == 0
  assert table[Not(PathContains('b'))] == 1
  assert table[Everything()] == 2
  assert len({All(Nothing()), All(Nothing()), Any(Nothing())}) == 2


def test_to_predicate_keeps_filters_and_callables(param):
  f = OfType(ParamState)
  assert to_predicate(f) is f

  def fn(path, state):
    return path == ('x',)

  assert to_predicate(fn) is fn
  lam = lambda path, state: True  # noqa: E731
  assert to_predicate(lam) is lam


def test_to_predicate_state_matches_by_identity(param):
  f = to_predicate(param)
  assert f((), param)
  assert f(('anything',), param)
  twin = ParamState(param.value)  # same value, different object
  assert not f((), twin)


def test_to_predicate_iterable_of_states(param, short):
  other = ParamState(jnp.zeros(2))
  for container in ([param, short], (param, short), {param, short}, frozenset([param, short])):
    f = to_predicate(container)
    assert f((), param) and f((), short)
    assert not f((), other)
  assert not to_predicate([])((), param)
  assert to_predicate([param]) == to_predicate((param,))
  assert hash(to_predicate([param, short])) == hash(to_predicate([short, param]))


def test_to_predicate_iterable_of_selectors(param, short):
  f = to_predicate([ShortTermState, 'w'])
  assert f(('w',), param)
  assert f(('b',), short)
  assert not f(('b',), param)


def test_to_predicate_class_and_string(param, short):
  assert to_predicate(ParamState) == OfType(ParamState)
  assert to_predicate(ParamState)((), param)
  assert not to_predicate(ParamState)((), short)
  assert to_predicate('w') == PathContains('w')
  assert to_predicate('w')(('fc', 'w'), short)
  assert not to_predicate('w')(('fc', 'weight'), short)


@pytest.mark.parametrize('bad', [True, False, None, 3, 2.5, object(), int, b'w'])
def test_to_predicate_type_error_names_selector(bad):
  with pytest.raises(TypeError, match='selector') as info:
    to_predicate(bad)
  assert repr(bad) in str(info.value)


def test_to_predicate_filter_class_uninstantiated():
  with pytest.raises(TypeError, match=r'Everything\(\.\.\.\)|instantiate'):
    to_predicate(Everything)


def test_combinators_accept_selectors(param, short):
  f = All(ParamState, Not('b'))
  assert f == All(OfType(ParamState), Not(PathContains('b')))
  assert f(('w',), param)
  assert not f(('b',), param)
  with pytest.raises(TypeError):
    Any(OfType(ParamState), None)
