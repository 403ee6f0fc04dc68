"""`StatefulMapping`'s public `static_argnums` / `static_argnames`, and None meaning none."""
import pytest

from meshstate.transform import StatefulMapping

from helpers import close, rand


@pytest.mark.parametrize('kwargs, argnums, argnames', [
    ({}, (), ()),
    ({'static_argnums': None, 'static_argnames': None}, (), ()),
    ({'static_argnums': 2}, (2,), ()),
    ({'static_argnums': 0}, (0,), ()),
    ({'static_argnums': [1, 2]}, (1, 2), ()),
    ({'static_argnames': 'mode'}, (), ('mode',)),
    ({'static_argnames': ['mode', 'flag']}, (), ('mode', 'flag')),
])
def test_public_static_attributes(kwargs, argnums, argnames):
  sm = StatefulMapping(lambda x: x, **kwargs)
  assert sm.static_argnums == argnums
  assert sm.static_argnames == argnames


def test_none_means_no_static_argument():
  x, y = rand(3), rand(3)
  sm = StatefulMapping(lambda a, b: a * b, in_axes=0, static_argnums=None, static_argnames=None)
  close(sm(x, y), x * y)
  with pytest.raises(TypeError, match=r'args\[1\] is a str.*mark it static'):  # nothing static
    StatefulMapping(lambda a, n: a * n, in_axes=(0, None), static_argnums=None,
                    static_argnames=None)(x, 'no')


def test_static_argument_zero_is_static():
  x = rand(4)
  sm = StatefulMapping(lambda flag, a: a * (2.0 if flag else -1.0), in_axes=(None, 0),
                       static_argnums=0)
  close(sm(True, x), 2.0 * x)
  close(sm(False, x), -x)


def test_static_argnames_attribute_drives_the_call():
  x = rand(3)
  sm = StatefulMapping(lambda a, *, mode: a + (1.0 if mode == 'up' else -1.0), in_axes=0,
                       static_argnames=['mode'])
  close(sm(x, mode='up'), x + 1.0)
  close(sm(x, mode='down'), x - 1.0)
  assert sm.static_argnames == ('mode',) and sm.static_argnums == ()
