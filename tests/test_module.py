import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshstate
from meshstate import HiddenState, LongTermState, ParamState, ShortTermState
from meshstate.nn import Module
from meshstate.util.filter import All, Not, OfType, PathContains


class Affine(Module):
  def __init__(self, n_in, n_out):
    super().__init__()
    self.weight = ParamState(jnp.ones((n_in, n_out), jnp.float32))

  def __call__(self, x):
    return x @ self.weight.value


class Linear(Module):
  def __init__(self, n_in, n_out):
    super().__init__()
    self.weight = ParamState(jnp.ones((n_in, n_out)))
    self.bias = ParamState(jnp.zeros((n_out,)))
    self.size = n_out  # not a state: ignored


class Net(Module):
  def __init__(self):
    super().__init__()
    self.scale = LongTermState(jnp.ones(()))
    self.layers = [Linear(2, 3), Linear(3, 4)]
    self.blocks = {'enc': Linear(4, 5), 'dec': [ShortTermState(jnp.zeros(5))]}
    self.pair = (HiddenState(jnp.zeros(1)), 'not a state')
    self.activation = jax.nn.relu


def test_module_identity():
  assert meshstate.nn.Module is Module
  assert Module.__module__ == 'meshstate.nn'
  Module()  # no arguments


def test_flat_paths():
  m = Linear(2, 3)
  states = m.states()
  assert list(states) == [('weight',), ('bias',)]
  assert states[('weight',)] is m.weight
  assert states[('bias',)] is m.bias


def test_nested_paths_in_definition_order():
  net = Net()
  states = net.states()
  assert list(states) == [
      ('scale',),
      ('layers', 0, 'weight'),
      ('layers', 0, 'bias'),
      ('layers', 1, 'weight'),
      ('layers', 1, 'bias'),
      ('blocks', 'enc', 'weight'),
      ('blocks', 'enc', 'bias'),
      ('blocks', 'dec', 0),
      ('pair', 0),
  ]
  assert states[('layers', 1, 'bias')] is net.layers[1].bias
  assert states[('blocks', 'enc', 'bias')] is net.blocks['enc'].bias
  assert states[('blocks', 'dec', 0)] is net.blocks['dec'][0]
  assert states[('pair', 0)] is net.pair[0]


def test_filter_by_type():
  net = Net()
  params = net.states(OfType(ParamState))
  assert list(params) == [('layers', 0, 'weight'), ('layers', 0, 'bias'),
                          ('layers', 1, 'weight'), ('layers', 1, 'bias'),
                          ('blocks', 'enc', 'weight'), ('blocks', 'enc', 'bias')]
  assert all(isinstance(s, ParamState) for s in params.values())
  assert list(net.states(ShortTermState)) == [('blocks', 'dec', 0)]  # a bare class selector
  assert net.states(OfType(HiddenState)) == {('pair', 0): net.pair[0]}
  assert net.states(PathContains('missing')) == {}


def test_filter_by_path():
  net = Net()
  assert list(net.states(PathContains('bias'))) == [
      ('layers', 0, 'bias'), ('layers', 1, 'bias'), ('blocks', 'enc', 'bias')]
  assert list(net.states('enc')) == [('blocks', 'enc', 'weight'), ('blocks', 'enc', 'bias')]
  assert list(net.states(PathContains(1))) == [('layers', 1, 'weight'), ('layers', 1, 'bias')]
  only = net.states(All(OfType(ParamState), Not(PathContains('bias')), PathContains('layers')))
  assert list(only) == [('layers', 0, 'weight'), ('layers', 1, 'weight')]


def test_filter_by_state_and_callable():
  net = Net()
  assert net.states(net.scale) == {('scale',): net.scale}
  chosen = [net.layers[1].bias, net.scale]
  assert list(net.states(chosen)) == [('scale',), ('layers', 1, 'bias')]
  assert list(net.states(lambda path, state: len(path) == 2)) == [('pair', 0)]


def test_filter_rejects_bad_selector():
  with pytest.raises(TypeError, match='selector'):
    Net().states(42)


def test_state_reachable_twice_is_listed_once():
  class Tied(Module):
    def __init__(self):
      super().__init__()
      self.encoder = Affine(2, 2)
      self.decoder = Affine(2, 2)
      self.decoder.weight = self.encoder.weight  # tied weights
      self.again = [self.encoder]  # the same submodule twice
      self.alias = self.encoder.weight

  m = Tied()
  states = m.states()
  assert list(states) == [('encoder', 'weight')]
  assert m.state_paths() == {m.encoder.weight: ('encoder', 'weight')}


def test_cycles_terminate():
  class Node(Module):
    def __init__(self):
      super().__init__()
      self.w = ParamState(jnp.zeros(1))

  a, b = Node(), Node()
  a.peer, b.peer = b, a
  a.self_list = [a]
  assert list(a.states()) == [('w',), ('peer', 'w')]
  text = repr(a)
  assert 'Node(...)' in text


def test_state_paths_is_reverse_of_states():
  net = Net()
  paths = net.state_paths()
  assert paths == {state: path for path, state in net.states().items()}
  assert paths[net.blocks['enc'].weight] == ('blocks', 'enc', 'weight')
  assert list(paths.values()) == list(net.states())


def test_states_does_not_read_values():
  from meshstate._state import Frame
  net = Net()
  with Frame() as frame:
    net.states()
    net.state_paths()
    repr(net)
  assert frame.touched == {}


def test_states_tracks_reassignment():
  m = Affine(2, 4)
  old = m.weight
  m.weight = ParamState(np.zeros(3))
  assert m.states() == {('weight',): m.weight}
  assert m.weight is not old


AFFINE_REPR = """Affine(
  weight=ParamState(
    value=ShapedArray(float32[2,4])
  )
)"""


def test_repr_affine_exact():
  assert repr(Affine(2, 4)) == AFFINE_REPR


def test_repr_empty_module():
  class Empty(Module):
    def __init__(self):
      super().__init__()
      self.n = 3
      self.things = []

  assert repr(Empty()) == 'Empty()'
  assert repr(Module()) == 'Module()'


def test_repr_nested():
  class Wrapper(Module):
    def __init__(self):
      super().__init__()
      self.inner = Affine(2, 4)
      self.bias = ShortTermState(jnp.zeros((4,), jnp.int32))

  assert repr(Wrapper()) == """Wrapper(
  inner=Affine(
    weight=ParamState(
      value=ShapedArray(float32[2,4])
    )
  ),
  bias=ShortTermState(
    value=ShapedArray(int32[4])
  )
)"""


def test_repr_containers():
  class Stack(Module):
    def __init__(self):
      super().__init__()
      self.layers = [Affine(1, 2), 'skip me', ParamState(jnp.zeros(3))]
      self.named = {'h': HiddenState(jnp.zeros((2, 2)))}
      self.one = (LongTermState(jnp.zeros(())),)

  assert repr(Stack()) == """Stack(
  layers=[
    Affine(
      weight=ParamState(
        value=ShapedArray(float32[1,2])
      )
    ),
    ParamState(
      value=ShapedArray(float32[3])
    )
  ],
  named={
    'h': HiddenState(
      value=ShapedArray(float32[2,2])
    )
  },
  one=(
    LongTermState(
      value=ShapedArray(float32[])
    ),
  )
)"""
