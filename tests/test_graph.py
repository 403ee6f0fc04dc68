"""`meshstate.graph`: states as a pytree keyed by path and back, and an orbax round trip.

The orbax test saves a model whose states are sharded on a 2 x 4 mesh (a weight split over
'model', a replicated bias, a pytree-valued momentum, a random key and a step counter), restores
the checkpoint straight onto the mesh from `graph.abstract`, and checks that training goes on
exactly as it does for the model that was never saved.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import meshstate
from meshstate import LongTermState, ParamState, ShortTermState, State, graph
from meshstate.random import RandomState
from meshstate.transform import pmap2
from meshstate.util.filter import PathContains


class Block(meshstate.nn.Module):
  def __init__(self, n):
    super().__init__()
    self.w = ParamState(jnp.arange(n, dtype=jnp.float32))
    self.stats = {'mean': LongTermState(jnp.zeros(n)), 'count': LongTermState(jnp.zeros((),
                                                                                    jnp.int32))}


class Net(meshstate.nn.Module):
  def __init__(self):
    super().__init__()
    self.blocks = [Block(2), Block(3)]
    self.opt = ShortTermState({'mu': jnp.ones(2), 'nu': (jnp.zeros(3),)})
    self.shared = self.blocks[0].w   # a second path to a state: listed once
    self.name = 'net'                # plain attributes are kept by split/merge
    self.run = meshstate.transform.jit(lambda: self.opt.value)   # shared, not copied


def values(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_state_is_a_nested_dict_keyed_by_path():
  net = Net()
  tree = graph.state(net)
  assert list(tree) == ['blocks', 'opt']
  assert list(tree['blocks']) == [0, 1]
  assert set(tree['blocks'][1]) == {'w', 'stats'}
  assert tree['blocks'][1]['w'] is net.blocks[1].w.value        # the value itself, no copy
  assert tree['opt'] is net.opt.value                              # a pytree value stays whole
  assert 'shared' not in tree
  flat = {path: s.value for path, s in net.states().items()}
  assert len(jax.tree.leaves(tree)) == len(jax.tree.leaves(list(flat.values())))


def test_state_with_filters_groups_each_state_once():
  net = Net()
  params = graph.state(net, ParamState)
  assert_trees_equal(params, {'blocks': {0: {'w': net.blocks[0].w.value},
                                         1: {'w': net.blocks[1].w.value}}})
  counts, rest = graph.state(net, PathContains('count'), ...)
  assert set(counts['blocks'][0]['stats']) == {'count'}
  assert set(rest['blocks'][0]['stats']) == {'mean'} and 'opt' in rest
  assert 'count' not in rest['blocks'][1]['stats']
  # states no filter selects are left out of `state`
  only_opt, = (graph.state(net, 'opt', 'nothing_by_this_name')[0],)
  assert list(only_opt) == ['opt']
  assert graph.state(net, 'nothing_by_this_name') == {}


def test_update_writes_in_place_and_leaves_the_rest():
  net = Net()
  before = values(graph.state(net))
  new_w = jnp.full(3, 7.0)
  graph.update(net, {'blocks': {1: {'w': new_w}}}, {'opt': {'mu': jnp.zeros(2), 'nu': ()}})
  np.testing.assert_array_equal(net.blocks[1].w.value, new_w)
  assert net.opt.value['nu'] == ()
  np.testing.assert_array_equal(net.blocks[0].w.value, before['blocks'][0]['w'])
  np.testing.assert_array_equal(net.blocks[1].stats['mean'].value,
                                before['blocks'][1]['stats']['mean'])


def test_update_rejects_unknown_paths_and_changes_nothing():
  net = Net()
  before = values(graph.state(net))
  with pytest.raises(ValueError, match=r"no state at 'blocks\.1\.bias'"):
    graph.update(net, {'blocks': {0: {'w': jnp.zeros(2)}, 1: {'bias': jnp.zeros(3)}}})
  with pytest.raises(TypeError, match=r"'opt' is a ShortTermState"):
    graph.update(net, {'blocks': {0: {'w': jnp.zeros(2)}}, 'opt': ShortTermState(1.0)})
  with pytest.raises(TypeError, match=r'expected a dict of values at blocks\.0'):
    graph.update(net, {'blocks': {0: jnp.zeros(2)}})
  assert_trees_equal(graph.state(net), before)
  with pytest.raises(TypeError, match='wrap it in a dict'):
    graph.state(State(1.0))


def test_update_inside_a_state_aware_jit():
  net = Net()
  w0 = np.asarray(net.blocks[1].w.value)

  @meshstate.transform.jit
  def double():
    graph.update(net, jax.tree.map(lambda x: 2 * x, graph.state(net, ParamState)))

  double()
  np.testing.assert_array_equal(net.blocks[1].w.value, 2 * w0)
  assert not isinstance(net.blocks[1].w.value, jax.core.Tracer)


def test_split_and_merge_make_an_independent_copy():
  net = Net()
  graphdef, params, rest = graph.split(net, ParamState, ...)
  assert set(graphdef.paths) == set(net.states())
  clone = graph.merge(graphdef, params, rest)
  assert type(clone) is Net and clone is not net and clone.name == 'net'
  assert clone.run is net.run and clone.blocks is not net.blocks
  assert clone.blocks[0].stats is not net.blocks[0].stats
  assert clone.shared is clone.blocks[0].w                       # sharing is kept
  assert type(clone.blocks[0].stats['count']) is LongTermState
  assert_trees_equal(graph.state(clone), graph.state(net))
  clone.blocks[0].w.value = jnp.zeros(2)                         # the copy is independent
  np.testing.assert_array_equal(net.blocks[0].w.value, [0.0, 1.0])
  again = graph.merge(graphdef, params, rest)                   # each merge is a new node
  assert again.blocks[0].w is not clone.blocks[0].w


def test_split_needs_every_state_and_merge_every_value():
  net = Net()
  with pytest.raises(ValueError, match=r"no filter selects the states .*blocks\.0\.stats\.mean"):
    graph.split(net, ParamState)
  graphdef, params, rest = graph.split(net, ParamState, ...)
  with pytest.raises(ValueError, match=r'no value for the states .*blocks\.0\.w'):
    graph.merge(graphdef, rest)
  with pytest.raises(TypeError, match='GraphDef'):
    graph.merge(params, rest)


def test_abstract_keeps_shape_dtype_and_sharding():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  w = jax.device_put(jnp.zeros((4, 8), jnp.bfloat16), NamedSharding(mesh, P(None, 'model')))
  states = {'w': ParamState(w), 'host': State(np.zeros(3, np.int8)), 'flag': State(True)}
  tree = graph.abstract(states)
  assert tree == graph.abstract(graph.state(states))
  assert isinstance(tree['w'], jax.ShapeDtypeStruct)
  assert (tree['w'].shape, tree['w'].dtype) == ((4, 8), jnp.bfloat16)
  assert tree['w'].sharding == w.sharding
  assert (tree['host'].shape, tree['host'].dtype) == ((3,), np.int8)
  assert tree['flag'] is True


# -- a sharded checkpoint with orbax ------------------------------------------------------------

ocp = pytest.importorskip('orbax.checkpoint')   # the `test` and `checkpoint` extras install it

LR = 0.1


class Regression(meshstate.nn.Module):
  """A linear layer trained with momentum on noisy inputs: every kind of state a run carries."""

  def __init__(self, mesh, seed):
    super().__init__()
    rng = np.random.RandomState(seed)
    put = lambda x, spec: jax.device_put(jnp.asarray(x, jnp.float32),  # noqa: E731
                                         NamedSharding(mesh, spec))
    self.w = ParamState(put(rng.standard_normal((3, 8)), P(None, 'model')))
    self.b = ParamState(put(rng.standard_normal(8), P()))
    # laid out as a step writes them back, so the first step's program serves the next ones
    self.momentum = ShortTermState({'w': put(np.zeros((3, 8)), P(None, 'model')),
                                    'b': put(np.zeros(8), P('model'))})
    self.rng = RandomState(jax.device_put(jax.random.PRNGKey(seed), NamedSharding(mesh, P())))
    self.step = LongTermState(jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P())))

  def train(self, x, y):   # one 'data' slice of the batch
    x = x + 0.01 * self.rng.normal(size=x.shape)

    def loss(params):
      return jnp.mean((x @ params['w'] + params['b'] - y) ** 2)

    params = {'w': self.w.value, 'b': self.b.value}
    value, grads = jax.value_and_grad(loss)(params)
    grads = jax.lax.pmean(grads, 'data')
    mom = jax.tree.map(lambda m, g: 0.9 * m + g, self.momentum.value, grads)
    self.momentum.value = mom
    self.w.value = self.w.value - LR * mom['w']
    self.b.value = self.b.value - LR * mom['b']
    self.step.value = self.step.value + 1
    return jax.lax.pmean(value, 'data')


def trainer(model, mesh):
  return pmap2(model.train, axis_name='data', mesh=mesh, out_axes=None)


def batches(k):
  rng = np.random.RandomState(100 + k)
  return (jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32),
          jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32))


def test_orbax_round_trip_restores_onto_the_mesh_and_training_goes_on(tmp_path):
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  model = Regression(mesh, seed=0)
  step = trainer(model, mesh)
  for k in range(2):
    step(*batches(k))
  saved = graph.state(model)
  assert saved['w'].sharding.spec == P(None, 'model')
  assert saved['momentum']['w'].sharding.spec == P(None, 'model')

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'ckpt', saved)
  ckpt.wait_until_finished()
  graphdef, _ = graph.split(model)

  # the model that was never saved goes on training
  losses = [float(step(*batches(k))) for k in range(2, 4)]
  trained = values(graph.state(model))

  # a freshly built model (other values) restores onto its own layout: the mesh, directly
  fresh = Regression(mesh, seed=1)
  target = graph.abstract(fresh)
  restored = ckpt.restore(tmp_path / 'ckpt', target)
  for got, want, where in zip(*map(jax.tree.leaves, (restored, saved, target))):
    assert got.sharding == where.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert restored['w'].sharding.spec == P(None, 'model') and restored['w'].sharding.mesh == mesh
  assert [s.data.shape for s in restored['w'].addressable_shards] == [(3, 2)] * 8
  graph.update(fresh, restored)
  assert_trees_equal(graph.state(fresh), saved)
  # a new model built from the graphdef alone, on the saved arrays' own layout
  restored = ckpt.restore(tmp_path / 'ckpt', graph.abstract(saved))
  rebuilt = graph.merge(graphdef, restored)
  assert type(rebuilt) is Regression and rebuilt.w is not model.w
  assert_trees_equal(graph.state(rebuilt), saved)
  for got, want in zip(jax.tree.leaves(graph.state(rebuilt)), jax.tree.leaves(saved)):
    assert got.sharding == want.sharding

  # training from the checkpoint repeats the never-saved run exactly (the model rolled back
  # to the checkpoint, so the step's compiled program serves it as is)
  graph.update(model, ckpt.restore(tmp_path / 'ckpt', graph.abstract(model)))
  assert int(model.step.value) == 2
  assert [float(step(*batches(k))) for k in range(2, 4)] == losses
  assert_trees_equal(values(graph.state(model)), trained)
  assert model.w.value.sharding.spec == P(None, 'model')
  assert int(model.step.value) == 4
