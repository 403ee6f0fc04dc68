"""Randomized differential tests: `pmap2`/`vmap2` with states against a `jax.vmap` oracle.

Hypothesis draws a whole call: the number of lanes (for `pmap2` the device count or a multiple
of it), 1-3 positional arrays with random shapes and `in_axes` (negative and `None` included),
`out_axes` per output, 0-4 `State`s with a random role and random `state_in_axes` /
`state_out_axes`, and one collective in the body. The oracle is the same body written purely
(state values passed in and returned by hand) under `jax.vmap` with the same axes and axis
name; meshstate's outputs, the states after each of three calls (values, shapes, no tracers)
and, for `pmap2`, their layout on the mesh must agree with it, and the third call must reuse
the cached program. Examples are derandomized (a fixed seed) and few, since each one compiles.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jax import lax

from meshstate import State
from meshstate.transform import pmap2, vmap2

from helpers import no_tracer

N = jax.device_count()
NAME = 'i'
COLLECTIVES = ('psum', 'pmean', 'pmax', 'all_gather', 'axis_index', 'ppermute')
# Roles of a state: 'read' broadcast read; 'mapped_in' read through state_in_axes; 'lane' written
# per lane and declared in state_out_axes; 'reduced' written with a psum/pmean (undeclared);
# 'rmw' read through state_in_axes and written back through state_out_axes. Undeclared per-lane
# writes follow the 'auto' policy: 'gathered' (write-only) is stacked along axis 0, and 'fed'
# (read, then written; size of the lane count along axis 0) is fed and written lane by lane.
ROLES = ('read', 'mapped_in', 'lane', 'reduced', 'rmw', 'gathered', 'fed')
DECLARED_IN, DECLARED_OUT = ('mapped_in', 'rmw'), ('lane', 'rmw')
# Outputs: 'lane' varies per lane; 'coll' is the collective's result; 'sum' is a psum; 'arg<k>'
# returns argument k (varying only when k is mapped).
# No shrinking: every step compiles, so a failure would stall CI; the full case is printed.
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class StateCase:
  role: str
  shape: tuple            # per-lane shape (for 'mapped_in'/'rmw' the lane axis is inserted)
  in_axis: int | None     # lane axis of the value read (declared in state_in_axes: DECLARED_IN)
  out_axis: int | None    # lane axis of the value written (in state_out_axes: DECLARED_OUT)
  read_first: bool        # 'lane'/'reduced': the old value is read before the write
  reduce: str             # 'reduced': 'psum' or 'pmean'


@dataclasses.dataclass(frozen=True)
class Case:
  lanes: int
  shapes: tuple           # per-lane shape of each positional argument
  in_axes: tuple          # one int or None per argument
  lead: int               # the argument whose shape the lane value takes
  collective: str
  outputs: tuple          # output kinds, see above
  out_axes: tuple         # one per output
  single: bool            # return the one output bare (out_axes an int/None, not a tuple)
  states: tuple           # StateCase per state
  bare: bool              # state axes: one State, not a list; `{0: x}` written as just `x`
  seed: int


# --- strategies -------------------------------------------------------------------------------

SHAPES = st.lists(st.integers(1, 3), max_size=2).map(tuple)


def axis_for(draw, rank, allow_none=False):
  """An axis into an array of `rank` dims after the lane axis is inserted (negative included)."""
  choices = st.integers(-(rank + 1), rank)
  return draw(st.one_of(st.none(), choices) if allow_none else choices)


def same_axis(draw, axis, rank):
  """`axis` written either way round (non-negative or negative)."""
  pos = axis % (rank + 1)
  return draw(st.sampled_from([pos, pos - (rank + 1)]))


def output_rank(case_shapes, lead, collective, kind):
  if kind.startswith('arg'):
    return len(case_shapes[int(kind[3:])])
  return len(case_shapes[lead]) + (kind == 'coll' and collective == 'all_gather')


def varies(in_axes, collective, kind):
  if kind.startswith('arg'):
    return in_axes[int(kind[3:])] is not None
  if kind == 'coll':
    return collective in ('axis_index', 'ppermute')
  return kind == 'lane'


def state_case(draw, role):
  shape = draw(SHAPES)
  in_axis = axis_for(draw, len(shape)) if role in DECLARED_IN else None
  out_axis = None
  if role == 'lane':
    out_axis = axis_for(draw, len(shape))
  elif role == 'rmw':   # the same dim on the way out, so that a second call reads it back
    out_axis = same_axis(draw, in_axis, len(shape))
  elif role in ('gathered', 'fed'):
    in_axis, out_axis = (0 if role == 'fed' else None), 0
  return StateCase(role, shape, in_axis, out_axis, draw(st.booleans()),
                   draw(st.sampled_from(['psum', 'pmean'])))


@st.composite
def cases(draw, lanes, collective, bad_none=False):
  """A call; with `bad_none` one per-lane output gets `out_axes=None` (an error)."""
  n_args = draw(st.integers(1, 3))
  shapes = tuple(draw(SHAPES) for _ in range(n_args))
  in_axes = [axis_for(draw, len(s), allow_none=True) for s in shapes]
  if all(a is None for a in in_axes):
    k = draw(st.integers(0, n_args - 1))
    in_axes[k] = axis_for(draw, len(shapes[k]))
  lead = draw(st.integers(0, n_args - 1))
  kinds = st.sampled_from(['lane', 'coll', 'sum'] + [f'arg{k}' for k in range(n_args)])
  outputs = draw(st.lists(kinds, min_size=1, max_size=3))
  if bad_none:
    outputs[draw(st.integers(0, len(outputs) - 1))] = 'lane'
  out_axes = []
  for kind in outputs:
    rank = output_rank(shapes, lead, collective, kind)
    if not varies(in_axes, collective, kind):
      out_axes.append(axis_for(draw, rank, allow_none=True))
    else:
      out_axes.append(None if bad_none and kind == 'lane' else axis_for(draw, rank))
  outputs = tuple(outputs)
  roles = draw(st.permutations(ROLES))[:draw(st.integers(0, 4))]   # 0-4 states, distinct roles
  return Case(draw(lanes), shapes, tuple(in_axes), lead, collective, outputs, tuple(out_axes),
              len(outputs) == 1 and draw(st.booleans()),
              tuple(state_case(draw, r) for r in roles), draw(st.booleans()),
              draw(st.integers(0, 2**16)))


PMAP_LANES = st.sampled_from([N, 2 * N, 4 * N])
VMAP_LANES = st.integers(1, 5)


# --- the body, once for states and once pure --------------------------------------------------

def with_lanes(shape, axis, lanes):
  if axis is None:
    return shape
  pos = axis % (len(shape) + 1)
  return shape[:pos] + (lanes,) + shape[pos:]


def apply_collective(name, v, lanes):
  if name == 'psum':
    return lax.psum(v, NAME)
  if name == 'pmean':
    return lax.pmean(v, NAME)
  if name == 'pmax':
    return lax.pmax(v, NAME)
  if name == 'all_gather':
    return lax.all_gather(v, NAME)
  if name == 'axis_index':
    return v * 0.5 + 2.0 * lax.axis_index(NAME)
  return lax.ppermute(v, NAME, [(j, (j + 1) % lanes) for j in range(lanes)])


def body(case, args, get, put):
  """The mapped function: `get(k)`/`put(k, value)` read and write state k."""
  scalar = sum((k + 1) * 0.25 * jnp.sum(a) for k, a in enumerate(args))
  for k, s in enumerate(case.states):
    if s.role in ('read', 'mapped_in'):
      scalar = scalar + (k + 1) * 0.5 * jnp.sum(get(k))
  v = args[case.lead] * 1.5 + scalar
  c = apply_collective(case.collective, v, case.lanes)
  total = jnp.sum(v) + 0.5 * jnp.sum(c)   # every write and 'lane' output sees the collective
  for k, s in enumerate(case.states):
    if s.role == 'lane':
      old = get(k) if s.read_first else jnp.zeros(s.shape)
      put(k, old + total * (k + 1) + jnp.arange(math.prod(jnp.shape(old))).reshape(jnp.shape(old)))
    elif s.role == 'reduced':
      reduce = lax.psum if s.reduce == 'psum' else lax.pmean
      old = get(k) if s.read_first else jnp.ones(s.shape)
      put(k, old * 0.5 + reduce(total * (k + 1), NAME))
    elif s.role in ('rmw', 'fed'):
      put(k, get(k) * 0.5 + total)
    elif s.role == 'gathered':
      put(k, jnp.zeros(s.shape) - total * (k + 1))
  made = {'lane': v * 2.0 + total, 'coll': c, 'sum': lax.psum(v, NAME)}
  outs = tuple(made[kind] if kind in made else args[int(kind[3:])] + 1.0
               for kind in case.outputs)
  return outs[0] if case.single else outs


def written(case):
  return [k for k, s in enumerate(case.states) if s.role not in ('read', 'mapped_in')]


def out_spec(case):
  return case.out_axes[0] if case.single else case.out_axes


def read(case):
  return [k for k, s in enumerate(case.states)
          if s.role in ('read', 'mapped_in', 'rmw', 'fed') or (s.role in ('lane', 'reduced')
                                                               and s.read_first)]


def oracle(case):
  """`jax.vmap` of the pure body, jitted once: `(args, values) -> (outputs, {k: new value})`."""
  ins, outs = read(case), written(case)

  def pure(args, old):
    vals, new = dict(zip(ins, old)), {}
    out = body(case, args, vals.__getitem__, new.__setitem__)
    return out, tuple(new[k] for k in outs)

  run = jax.jit(jax.vmap(pure, in_axes=(case.in_axes, tuple(case.states[k].in_axis for k in ins)),
                         out_axes=(out_spec(case), tuple(case.states[k].out_axis for k in outs)),
                         axis_name=NAME, axis_size=case.lanes))

  def call(args, values):
    out, new = run(tuple(args), tuple(values[k] for k in ins))
    return out, dict(zip(outs, new))
  return call


def inputs(case):
  rng = np.random.RandomState(case.seed)
  args = [jnp.asarray(rng.standard_normal(with_lanes(s, a, case.lanes)), jnp.float32)
          for s, a in zip(case.shapes, case.in_axes)]
  values = [jnp.asarray(rng.standard_normal(with_lanes(s.shape, s.in_axis, case.lanes)),
                        jnp.float32) for s in case.states]
  return args, values


def state_axes(case, states, attr):
  axes = {}
  declared = DECLARED_IN if attr == 'in_axis' else DECLARED_OUT
  for s, spec in zip(states, case.states):
    if spec.role in declared:
      axes.setdefault(getattr(spec, attr), []).append(s)
  if case.bare:
    axes = {a: sel[0] if len(sel) == 1 else sel for a, sel in axes.items()}
    if list(axes) == [0]:
      return axes[0]
  return axes or None


def mapped(transform, case, states, traces):
  def fn(*args):
    traces.append(None)
    return body(case, args, lambda k: states[k].value,
                lambda k, v: setattr(states[k], 'value', v))
  return transform(fn, axis_name=NAME, in_axes=case.in_axes, out_axes=out_spec(case),
                   state_in_axes=state_axes(case, states, 'in_axis'),
                   state_out_axes=state_axes(case, states, 'out_axis'))


# --- checks -----------------------------------------------------------------------------------

def assert_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert jnp.shape(a) == jnp.shape(e)
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-4)


def assert_states(states, expected):
  no_tracer(*states)
  for s, e in zip(states, expected):
    assert jnp.shape(s.value) == jnp.shape(e), s
    np.testing.assert_allclose(np.asarray(s.value), np.asarray(e), rtol=1e-5, atol=1e-4)


def lane_dims(x):
  return [d for d, p in enumerate(x.sharding.spec) if p == NAME]


def assert_layout(case, outs, states):
  """pmap2's layout: the mesh axis at each out axis; unmapped results replicated."""
  for out, axis in zip(jax.tree.leaves(outs), case.out_axes):
    if axis is None:
      assert out.sharding.is_fully_replicated
    else:
      assert lane_dims(out) == [axis % out.ndim]
  for s, spec in zip(states, case.states):
    if spec.out_axis is not None:
      assert lane_dims(s.value) == [spec.out_axis % s.value.ndim], s
    elif spec.role == 'reduced':
      assert s.value.sharding.is_fully_replicated, s


def make(transform, case):
  args, values = inputs(case)
  states = [State(v, name=f's{k}_{s.role}') for k, (v, s) in enumerate(zip(values, case.states))]
  traces = []
  return args, values, states, traces, mapped(transform, case, states, traces)


def run_case(transform, case):
  args, values, states, traces, f = make(transform, case)
  # Written states come back in a new layout, so the second call may trace again; the third
  # runs the cached program unless a state read broadcast and written per lane grows each call.
  grows = any(s.role == 'lane' and s.read_first for s in case.states)
  expected, reference = list(values), oracle(case)
  for call in range(3):
    want, new = reference(args, expected)
    for k, v in new.items():
      expected[k] = v
    before = len(traces)
    got = f(*args)
    if call == 2 and not grows:
      assert len(traces) == before, 'the third call must not trace again'
    assert_close(got, want)
    assert_states(states, expected)
    if transform is pmap2:
      assert_layout(case, got, states)


@pytest.mark.parametrize('collective', COLLECTIVES)
@settings(max_examples=3, **SETTINGS)
@given(data=st.data())
def test_pmap2_matches_vmap_oracle(collective, data):
  run_case(pmap2, data.draw(cases(PMAP_LANES, collective), label='case'))


@pytest.mark.parametrize('collective', COLLECTIVES)
@settings(max_examples=2, **SETTINGS)
@given(data=st.data())
def test_vmap2_matches_vmap_oracle(collective, data):
  run_case(vmap2, data.draw(cases(VMAP_LANES, collective), label='case'))


@pytest.mark.parametrize('transform, lanes', [(pmap2, PMAP_LANES), (vmap2, VMAP_LANES)],
                         ids=['pmap2', 'vmap2'])
@settings(max_examples=4, **SETTINGS)
@given(data=st.data())
def test_out_axes_none_on_a_per_lane_output_is_an_error(transform, lanes, data):
  case = data.draw(cases(lanes, data.draw(st.sampled_from(COLLECTIVES)), bad_none=True))
  args, values, states, _, f = make(transform, case)
  with pytest.raises(ValueError, match='out_axes'):   # the oracle refuses it too
    oracle(case)(args, values)
  with pytest.raises(ValueError, match='out_axes'):
    f(*args)
  assert_states(states, values)
