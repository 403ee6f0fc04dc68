"""Typing: meshstate ships its annotations (PEP 561), and the typed examples are true at run time.

pyright checks `src/` and `tests/typing_examples.py` in `.ci/run` (the `lint` extra); here each
example runs, so the forms it type-checks (decorator and call forms, `explain`, `lower`) are
forms that work.
"""
import inspect
import pathlib
import tomllib
import typing

import jax
import pytest

import meshstate
import typing_examples
from meshstate.transform import StatefulMapping

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_py_typed_ships_with_the_package():
  assert (ROOT / 'src' / 'meshstate' / 'py.typed').is_file()
  assert 'py.typed' in PYPROJECT['tool']['setuptools']['package-data']['meshstate']


def test_pyright_checks_the_package_and_the_examples():
  config = PYPROJECT['tool']['pyright']
  assert set(config['include']) == {'src', 'tests/typing_examples.py'}
  assert any(r.startswith('pyright') for r in PYPROJECT['project']['optional-dependencies']['lint'])
  assert 'pyright' in (ROOT / '.ci' / 'run').read_text()


@pytest.mark.parametrize('name', ['pmap2', 'vmap2', 'jit', 'shard_map', 'grad', 'value_and_grad',
                                  'checkpoint'])
def test_decorator_and_call_forms_have_overloads(name):
  fun = getattr(meshstate.transform, name)
  overloads = typing.get_overloads(fun)
  assert len(overloads) == 2, name
  firsts = [next(iter(inspect.signature(o).parameters.values())) for o in overloads]
  assert [p.default for p in firsts] == [inspect.Parameter.empty, None]   # call, decorator


@pytest.mark.parametrize('example', typing_examples.EXAMPLES, ids=lambda f: f.__name__)
def test_typed_example_runs(example):
  out = example()
  assert all(isinstance(x, (jax.Array, float, str)) for x in jax.tree.leaves(out))


def test_decorated_method_and_function_keep_their_identity():
  out, scaled, text = typing_examples.pmap2_forms()
  n = jax.local_device_count()
  assert out.shape == (n,) and scaled.tolist() == [float(n)] * n
  assert 'step' in text and 'in_specs' in text
  assert isinstance(typing_examples.Affine.scaled, StatefulMapping)
