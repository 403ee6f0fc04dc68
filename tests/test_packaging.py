"""Packaging: the version is written once, and the files that name versions agree with it."""
import pathlib
import re
import tomllib

import meshstate

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / 'pyproject.toml').read_text())


def test_version_is_read_from_the_package():
  project = PYPROJECT['project']
  assert 'version' not in project and 'version' in project['dynamic']
  assert PYPROJECT['tool']['setuptools']['dynamic']['version'] == {'attr': 'meshstate.__version__'}
  # setuptools reads it from the source text without importing meshstate (and jax): a literal.
  init = (ROOT / 'src' / 'meshstate' / '__init__.py').read_text()
  assert re.search(rf"^__version__ = '{re.escape(meshstate.__version__)}'$", init, re.M)
  assert re.fullmatch(r'\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?', meshstate.__version__)


def test_changelog_has_the_version_and_unreleased_sections():
  text = (ROOT / 'CHANGELOG.md').read_text()
  headings = re.findall(r'^## \[([^\]]+)\]', text, re.M)
  assert headings[0] == 'Unreleased'
  assert meshstate.__version__ in headings
  for name in headings:   # every heading has its link at the bottom
    assert re.search(rf'^\[{re.escape(name)}\]: https://', text, re.M), name


def test_ruff_is_pinned_alike_in_the_lint_extra_and_pre_commit():
  (pin,) = [r for r in PYPROJECT['project']['optional-dependencies']['lint'] if 'ruff' in r]
  rev = re.search(r'astral-sh/ruff-pre-commit\s+rev: v(\S+)',
                  (ROOT / '.pre-commit-config.yaml').read_text())
  assert rev and pin == f'ruff=={rev.group(1)}'


def test_the_jax_lower_bound_is_declared_checked_and_tested_alike():
  from meshstate._compat import MIN_JAX
  deps = PYPROJECT['project']['dependencies']
  assert f'jax>={MIN_JAX}' in deps and f'jaxlib>={MIN_JAX}' in deps
  lowest = (ROOT / '.ci' / 'constraints' / 'jax-lowest.txt').read_text()
  assert re.findall(r'^(jax|jaxlib)==(\S+)$', lowest, re.M) == [('jax', MIN_JAX),
                                                                 ('jaxlib', MIN_JAX)]
  tox = (ROOT / 'tox.ini').read_text()
  for name in ('jax-lowest', 'jax-0.10.2', 'jax-newest'):   # each tox environment pins its jax
    assert f'{{toxinidir}}/.ci/constraints/{name}.txt' in tox, name
  assert '.ci/constraints/jax-newest.txt' in (ROOT / '.ci' / 'run').read_text()
