"""Tests for `meshstate.random`: RandomState, the lazy DEFAULT state and the distributions."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshstate.random as mr
from meshstate._state import Frame

SRC = pathlib.Path(__file__).resolve().parents[1] / 'src'


def test_same_seed_same_numbers():
  a, b = mr.RandomState(0), mr.RandomState(0)
  np.testing.assert_array_equal(a.value, b.value)
  np.testing.assert_array_equal(mr.normal(size=4, key=a.split_key()),
                                mr.normal(size=4, key=b.split_key()))
  mr.seed(3)
  x = mr.normal(size=5)
  mr.seed(3)
  np.testing.assert_array_equal(x, mr.normal(size=5))


def test_different_seeds_differ():
  assert not np.array_equal(mr.RandomState(0).split_key(), mr.RandomState(1).split_key())


def test_int_seed_is_legacy_key():
  rs = mr.RandomState(42)
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(42))
  assert rs.value.dtype == jnp.uint32 and rs.value.shape == (2,)


def test_none_seed_draws_fresh_entropy():
  assert not np.array_equal(mr.RandomState().value, mr.RandomState().value)


def test_explicit_key_leaves_default_untouched():
  before = np.asarray(mr.DEFAULT.value)
  key = jax.random.PRNGKey(7)
  x = mr.normal(size=3, key=key)
  y = mr.uniform(size=3, key=key)
  np.testing.assert_array_equal(mr.DEFAULT.value, before)
  np.testing.assert_array_equal(x, jax.random.normal(key, (3,)))
  np.testing.assert_array_equal(y, jax.random.uniform(key, (3,)))


def test_draws_advance_default():
  mr.seed(0)
  k0 = np.asarray(mr.DEFAULT.value)
  a = mr.normal(size=3)
  k1 = np.asarray(mr.DEFAULT.value)
  b = mr.normal(size=3)
  assert not np.array_equal(k0, k1)
  assert not np.array_equal(k1, np.asarray(mr.DEFAULT.value))
  assert not np.array_equal(a, b)


def test_seed_method_and_key_constructor():
  key = jax.random.PRNGKey(5)
  rs = mr.RandomState(key)
  assert rs.value is key
  rs.seed(9)
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(9))
  typed = jax.random.key(1)
  assert mr.RandomState(typed).value is typed
  with pytest.raises(TypeError, match='uint32'):
    mr.RandomState(jnp.zeros(3, jnp.float32))


def test_split_key_shapes_and_advance():
  rs = mr.RandomState(0)
  k0 = np.asarray(rs.value)
  keys = rs.split_key(4)
  assert keys.shape == (4, 2) and keys.dtype == jnp.uint32
  k1 = np.asarray(rs.value)
  assert not np.array_equal(k0, k1)
  one = rs.split_key()
  assert one.shape == (2,)
  assert not np.array_equal(k1, np.asarray(rs.value))
  assert len({tuple(k) for k in np.asarray(keys).tolist()}) == 4
  assert mr.split_key(3).shape == (3, 2)


def test_split_key_records_access():
  rs = mr.RandomState(0)
  with Frame() as frame:
    rs.split_key()
  assert rs in frame.reads and rs in frame.writes
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(0))  # restored on exit


def test_default_drawn_inside_frame_is_recorded():
  with Frame() as frame:
    mr.normal()
  assert mr.DEFAULT in frame.reads and mr.DEFAULT in frame.writes


@pytest.mark.parametrize('fn, args, kwargs, shape', [
    (mr.normal, (), {'size': (2, 3)}, (2, 3)),
    (mr.normal, (0.0, jnp.ones(3)), {}, (3,)),
    (mr.normal, (jnp.zeros((2, 1)), jnp.ones(4)), {}, (2, 4)),
    (mr.normal, (0.0, 2.0), {}, ()),
    (mr.uniform, (jnp.zeros(2),), {}, (2,)),
    (mr.uniform, (), {'size': 4}, (4,)),
    (mr.randn, (2, 5), {}, (2, 5)),
    (mr.rand, (3,), {}, (3,)),
    (mr.random, ((2, 2),), {}, (2, 2)),
    (mr.random_sample, (), {}, ()),
    (mr.randint, (0, jnp.array([5, 6, 7])), {}, (3,)),
    (mr.bernoulli, (jnp.full((2, 2), 0.5),), {}, (2, 2)),
    (mr.choice, (jnp.arange(4),), {'size': (3, 2)}, (3, 2)),
    (mr.choice, (5,), {}, ()),
    (mr.exponential, (jnp.ones(3),), {}, (3,)),
    (mr.gamma, (2.0,), {'size': (4,)}, (4,)),
    (mr.beta, (jnp.ones(2), 2.0), {}, (2,)),
    (mr.poisson, (jnp.ones((1, 3)),), {}, (1, 3)),
    (mr.categorical, (jnp.zeros((4, 6)),), {}, (4,)),
    (mr.categorical, (jnp.zeros(6),), {'size': (5,)}, (5,)),
    (mr.gumbel, (jnp.zeros(3),), {}, (3,)),
    (mr.laplace, (0.0, jnp.ones((2, 2))), {}, (2, 2)),
    (mr.logistic, (), {'size': [2, 3]}, (2, 3)),
    (mr.truncated_normal, (-1.0, jnp.ones(3)), {}, (3,)),
])
def test_shapes(fn, args, kwargs, shape):
  assert fn(*args, key=jax.random.PRNGKey(0), **kwargs).shape == shape


def test_normal_loc_scale_applied():
  key = jax.random.PRNGKey(1)
  x = mr.normal(10.0, 0.5, size=1000, key=key)
  np.testing.assert_allclose(x, 10.0 + 0.5 * jax.random.normal(key, (1000,)), rtol=1e-6)
  assert x.dtype == jnp.float32
  assert mr.normal(size=2, key=key, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_randint_dtype_and_range():
  x = mr.randint(3, 9, size=500, key=jax.random.PRNGKey(0))
  assert x.dtype == jnp.int32
  assert int(x.min()) >= 3 and int(x.max()) <= 8
  y = mr.randint(4, size=200, dtype=jnp.uint8, key=jax.random.PRNGKey(1))
  assert y.dtype == jnp.uint8
  assert set(np.asarray(y).tolist()) == {0, 1, 2, 3}


def test_choice_without_replacement_distinct():
  x = mr.choice(jnp.arange(100, 120), size=15, replace=False, key=jax.random.PRNGKey(2))
  assert len(set(np.asarray(x).tolist())) == 15
  assert set(np.asarray(x).tolist()) <= set(range(100, 120))
  w = mr.choice(3, size=50, p=jnp.array([0.0, 1.0, 0.0]), key=jax.random.PRNGKey(0))
  assert np.asarray(w).tolist() == [1] * 50


def test_permutation_and_shuffle():
  p = mr.permutation(10, key=jax.random.PRNGKey(3))
  assert sorted(np.asarray(p).tolist()) == list(range(10))
  assert np.asarray(p).tolist() != list(range(10))
  m = jnp.arange(12).reshape(3, 4)
  s = mr.shuffle(m, axis=1, key=jax.random.PRNGKey(4))
  assert s.shape == (3, 4)
  # columns are moved as a whole
  assert sorted(np.asarray(s[0]).tolist()) == [0, 1, 2, 3]
  np.testing.assert_array_equal(s[1], s[0] + 4)
  assert sorted(np.asarray(mr.shuffle([5, 6, 7], key=jax.random.PRNGKey(0))).tolist()) == [5, 6, 7]


def test_bernoulli_boolean():
  x = mr.bernoulli(0.5, size=200, key=jax.random.PRNGKey(0))
  assert x.dtype == jnp.bool_
  assert 0 < int(x.sum()) < 200
  assert bool(mr.bernoulli(1.0, size=10, key=jax.random.PRNGKey(1)).all())


def test_truncated_normal_bounds():
  x = mr.truncated_normal(-0.5, 0.25, size=2000, key=jax.random.PRNGKey(0))
  assert float(x.min()) >= -0.5 and float(x.max()) <= 0.25
  y = mr.truncated_normal(9.0, 11.0, size=2000, loc=10.0, scale=3.0, key=jax.random.PRNGKey(1))
  assert float(y.min()) >= 9.0 and float(y.max()) <= 11.0
  assert float(y.max()) - float(y.min()) > 1.5


def test_distribution_values():
  key = jax.random.PRNGKey(0)
  assert float(mr.exponential(2.0, size=4000, key=key).mean()) == pytest.approx(2.0, rel=0.1)
  assert float(mr.gamma(3.0, 2.0, size=4000, key=key).mean()) == pytest.approx(6.0, rel=0.1)
  assert float(mr.poisson(4.0, size=4000, key=key).mean()) == pytest.approx(4.0, rel=0.1)
  u = mr.uniform(2.0, 3.0, size=1000, key=key)
  assert float(u.min()) >= 2.0 and float(u.max()) < 3.0
  b = mr.beta(2.0, 2.0, size=1000, key=key)
  assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0
  c = mr.categorical(jnp.array([-1e9, 0.0, -1e9]), size=(20,), key=key)
  assert np.asarray(c).tolist() == [1] * 20


def test_traced_parameters():
  @jax.jit
  def f(scale, key):
    return mr.normal(0.0, scale, key=key), mr.uniform(0.0, scale, key=key)

  key = jax.random.PRNGKey(0)
  a, b = f(jnp.full(3, 2.0), key)
  np.testing.assert_allclose(a, 2.0 * jax.random.normal(key, (3,)), rtol=1e-6)
  assert b.shape == (3,)
  out = jax.vmap(lambda s, k: mr.normal(0.0, s, key=k))(jnp.arange(4.0), jax.random.split(key, 4))
  assert out.shape == (4,) and float(out[0]) == 0.0


def test_default_is_random_state():
  assert isinstance(mr.DEFAULT, mr.RandomState)
  assert mr.DEFAULT is mr.DEFAULT
  assert mr.RandomState.__module__ == 'meshstate.random'
  assert 'DEFAULT' in mr.__all__ and 'DEFAULT' in dir(mr)
  with pytest.raises(AttributeError):
    mr.NOT_A_NAME  # noqa: B018


def _run_fresh(code):
  env = dict(os.environ, PYTHONPATH=str(SRC))
  res = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  return res.stdout.strip()


def test_default_not_created_at_import():
  code = ('import meshstate.random as r, jax\n'
          'assert r._default_state is None, "DEFAULT created at import"\n'
          'd = r.DEFAULT\n'
          'assert isinstance(d, r.RandomState) and r._default_state is d\n'
          'print("ok", d.value.shape)\n')
  assert _run_fresh(code) == 'ok (2,)'


def test_default_first_created_inside_trace_is_global():
  # First use happens while jax.jit traces inside a frame: DEFAULT must be recorded like any
  # other state (not treated as local to the trace) and keep a concrete key afterwards.
  code = ('import meshstate.random as r, jax\n'
          'from meshstate._state import Frame\n'
          'def f(x):\n'
          '  with Frame() as fr:\n'
          '    y = r.normal() + x\n'
          '  assert r._default_state in fr.reads and r._default_state in fr.writes\n'
          '  return y\n'
          'jax.jit(f)(1.0)\n'
          'k = r._default_state.value\n'
          'assert not isinstance(k, jax.core.Tracer), type(k)\n'
          'print("ok", k.shape, k.dtype)\n')
  assert _run_fresh(code) == 'ok (2,) uint32'


# --- distributions as RandomState methods ----------------------------------------------------

SAMPLER_CALLS = [
    ('normal', (1.0, 2.0), {'size': (2, 3)}),
    ('uniform', (), {'low': -1.0, 'high': 1.0, 'size': 4}),
    ('randn', (2, 3), {}),
    ('rand', (3,), {}),
    ('random', ((2, 2),), {}),
    ('random_sample', (), {'size': 3}),
    ('randint', (2, 9), {'size': 5}),
    ('bernoulli', (0.4,), {'size': 6}),
    ('choice', (7,), {'size': 4, 'replace': False}),
    ('permutation', (6,), {}),
    ('shuffle', (jnp.arange(5),), {}),
    ('truncated_normal', (-1.0, 1.0), {'size': 3}),
    ('exponential', (2.0,), {'size': 3}),
    ('gamma', (2.0,), {'size': 3}),
    ('beta', (2.0, 3.0), {'size': 3}),
    ('poisson', (3.0,), {'size': 3}),
    ('categorical', (jnp.zeros((2, 5)),), {}),
    ('gumbel', (), {'size': 3}),
    ('laplace', (0.0, 2.0), {'size': 3}),
    ('logistic', (), {'size': 3}),
]


def test_every_distribution_is_a_method_with_the_module_signature():
  import inspect
  names = [n for n in mr.__all__ if n not in ('RandomState', 'DEFAULT', 'seed', 'split_key')]
  assert sorted(names) == sorted(n for n, _, _ in SAMPLER_CALLS)
  for name in names:
    method = inspect.signature(getattr(mr.RandomState(0), name))
    assert inspect.signature(getattr(mr, name)) == method, name
    assert getattr(mr, name).__doc__ == getattr(mr.RandomState, name).__doc__


@pytest.mark.parametrize('name, args, kwargs', SAMPLER_CALLS, ids=[c[0] for c in SAMPLER_CALLS])
def test_method_draws_from_its_own_key(name, args, kwargs):
  rs, twin, other = mr.RandomState(3), mr.RandomState(3), mr.RandomState(4)
  default_before, other_before = np.asarray(mr.DEFAULT.value), np.asarray(other.value)
  got = getattr(rs, name)(*args, **kwargs)
  want = getattr(mr, name)(*args, key=twin.split_key(), **kwargs)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(rs.value, twin.value)              # advanced like split_key()
  assert not np.array_equal(rs.value, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(other.value, other_before)         # only its own instance
  np.testing.assert_array_equal(mr.DEFAULT.value, default_before)  # DEFAULT untouched


def test_method_with_explicit_key_leaves_the_instance_untouched():
  rs, key = mr.RandomState(1), jax.random.PRNGKey(9)
  np.testing.assert_array_equal(rs.normal(size=3, key=key), jax.random.normal(key, (3,)))
  np.testing.assert_array_equal(rs.randn(2, key=key), jax.random.normal(key, (2,)))
  np.testing.assert_array_equal(rs.normal(0.0, 1.0, 3, key), jax.random.normal(key, (3,)))
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(1))


def test_positional_key_none_draws_from_the_instance():
  rs, twin = mr.RandomState(2), mr.RandomState(2)
  np.testing.assert_array_equal(rs.normal(0.0, 1.0, 3, None),
                                jax.random.normal(twin.split_key(), (3,)))
  np.testing.assert_array_equal(rs.value, twin.value)


def test_module_functions_still_draw_from_default():
  rs = mr.RandomState(0)
  mr.seed(5)
  twin = mr.RandomState(5)
  np.testing.assert_array_equal(mr.uniform(size=3), mr.uniform(size=3, key=twin.split_key()))
  np.testing.assert_array_equal(mr.randn(2), mr.randn(2, key=twin.split_key()))
  np.testing.assert_array_equal(mr.DEFAULT.value, twin.value)
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(0))


def test_bad_input_leaves_the_key_unchanged():
  rs = mr.RandomState(0)
  with pytest.raises(TypeError):
    rs.normal(size=(2, 'x'))
  np.testing.assert_array_equal(rs.value, jax.random.PRNGKey(0))
  mr.seed(1)
  with pytest.raises(TypeError):
    mr.uniform(size=(2, 'x'))
  np.testing.assert_array_equal(mr.DEFAULT.value, jax.random.PRNGKey(1))


def test_method_inside_state_aware_jit():
  from meshstate.transform import jit
  rs, twin = mr.RandomState(0), mr.RandomState(0)
  mr.seed(0)
  default_before = np.asarray(mr.DEFAULT.value)
  step = jit(lambda x: x + rs.normal(size=(3,)))
  for _ in range(2):
    np.testing.assert_allclose(step(jnp.ones(3)), 1.0 + mr.normal(size=3, key=twin.split_key()),
                               rtol=1e-6)
    np.testing.assert_array_equal(rs.value, twin.value)
  np.testing.assert_array_equal(mr.DEFAULT.value, default_before)


def test_method_inside_pmap2_gives_each_device_its_own_draw():
  from meshstate.transform import pmap2
  n = jax.device_count()
  mr.seed(0)
  default_before = np.asarray(mr.DEFAULT.value)
  rs, twin = mr.RandomState(0), mr.RandomState(0)
  out = pmap2(lambda v: v + rs.uniform(size=(2,)), axis_name='i')(jnp.zeros(n))
  by_hand = pmap2(lambda v: v + mr.uniform(size=(2,), key=twin.split_key()),
                  axis_name='i')(jnp.zeros(n))
  assert out.shape == (n, 2)
  assert len({tuple(np.asarray(r).tolist()) for r in out}) == n
  np.testing.assert_allclose(out, by_hand, rtol=1e-6)
  np.testing.assert_array_equal(rs.value, jax.random.split(jax.random.PRNGKey(0))[0])
  np.testing.assert_array_equal(rs.value, twin.value)
  np.testing.assert_array_equal(mr.DEFAULT.value, default_before)
