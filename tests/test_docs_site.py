"""The documentation site builds with warnings as errors, and every code block in it runs.

`mkdocs build --strict` (mkdocs.yml: mkdocs-material, mkdocstrings, the notebook hook) must
pass: a broken link, a page missing from the nav, a docstring mkdocstrings cannot read, or an
Args entry for a parameter that does not exist fails it. The site's ```python blocks run here
or in the test named for their page; ```text blocks are what those blocks print; ```bash blocks
are shell commands (installing, launching processes), which these tests do not run.
"""
from __future__ import annotations

import ast
import html
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
FENCE = re.compile(r'^```(\w*)\n(.*?)^```\s*$', re.M | re.S)
# Where each page's ```python blocks run (this file runs index.md, README.md and the ```py
# block of multihost.md).
RUN_BY = {'migration.md': 'test_migration_doc.py', 'multihost.md': 'test_multihost_doc.py',
          'conformance.md': 'test_conformance_doc.py', 'index.md': 'test_docs_site.py',
          'examples.md': 'test_examples.py', 'parallelisation.ipynb': 'test_notebook.py'}

needs_mkdocs = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ('mkdocs', 'mkdocstrings', 'material')),
    reason='the docs extra is not installed (pip install -e ".[docs]")')


def blocks(path: pathlib.Path, kind: str) -> list[str]:
  return [body for lang, body in FENCE.findall(path.read_text()) if lang == kind]


def run_script(tmp_path: pathlib.Path, code: str, devices: bool) -> str:
  """Run `code` in a fresh process (8 CPU devices forced by flag when `devices`); its stdout."""
  script = tmp_path / 'blocks.py'
  script.write_text(code)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=str(ROOT / 'src'), JAX_PLATFORMS='cpu')
  if devices:
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@needs_mkdocs
def test_site_builds_strict(tmp_path):
  site = tmp_path / 'site'
  env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
  proc = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-q',
                         '-f', str(ROOT / 'mkdocs.yml'), '-d', str(site)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  def page(name: str) -> str:   # the text of a page, without its HTML tags
    return html.unescape(re.sub(r'<[^>]+>', '', (site / name / 'index.html').read_text()))

  # The guides, the notebook (converted by the hook, with its outputs) and the examples.
  tutorial = page('parallelisation')
  assert 'Parallelisation with meshstate' in tutorial and 'local device count: 8' in tutorial
  examples = page('examples')
  for script in (DOCS / 'examples').glob('*.py'):   # embedded whole
    assert all(line in examples for line in script.read_text().splitlines()), script.name
  for guide in ('migration', 'multihost', 'conformance'):
    title = re.search(r'^# (.*)$', (DOCS / f'{guide}.md').read_text(), re.M).group(1)
    assert title.replace('`', '') in page(guide), guide
  # The API reference: every public callable, its Args rendered as a parameter table.
  raw = (site / 'api' / 'transform' / 'index.html').read_text()
  transform = page('api/transform')
  for name in ('pmap2', 'vmap2', 'jit', 'shard_map', 'StatefulMapping', 'grad', 'for_loop'):
    assert f'id="meshstate.transform.{name}"' in raw, name
  assert 'unexpected_out_state_mapping' in transform and "'raise'" in transform
  assert 'Parameters:' in transform and 'Examples:' in transform
  assert '<blockquote>' not in raw   # doctest lines are shown as code, not as quotes
  assert 'id="meshstate.random.RandomState.normal"' in (site / 'api/random/index.html').read_text()


def test_every_page_says_where_its_code_runs():
  pages = {p.name for p in DOCS.glob('*.md')} | {'parallelisation.ipynb'}
  assert pages == set(RUN_BY)
  for test in set(RUN_BY.values()):
    assert (ROOT / 'tests' / test).is_file(), test
  kinds = {lang for page in DOCS.glob('*.md') for lang, _ in FENCE.findall(page.read_text())}
  assert kinds <= {'python', 'py', 'text', 'bash'}, kinds


@needs_mkdocs
def test_notebook_is_a_page_of_the_site():
  sys.path.insert(0, str(ROOT / 'tools'))
  try:
    import docs_hooks
  finally:
    sys.path.pop(0)
  text = docs_hooks.notebook_markdown(DOCS / 'parallelisation.ipynb')
  cells = json.loads((DOCS / 'parallelisation.ipynb').read_text())['cells']
  code = [''.join(c['source']).strip('\n') for c in cells if c['cell_type'] == 'code']
  assert [b.strip('\n') for b in blocks_of(text, 'python')] == code


def blocks_of(text: str, kind: str) -> list[str]:
  return [body for lang, body in FENCE.findall(text) if lang == kind]


def test_home_page_blocks_run(tmp_path):
  page = DOCS / 'index.md'
  out = run_script(tmp_path, '\n\n'.join(blocks(page, 'python')), devices=False)
  printed = [line.rstrip() for line in out.splitlines()]
  for shown in blocks(page, 'text'):
    for line in shown.splitlines():
      assert line.rstrip() in printed, (line, out)
  assert 'bytes_per_device' in out and 'shard_map' in out


def test_readme_blocks_run(tmp_path):
  code = blocks(ROOT / 'README.md', 'python')
  assert len(code) >= 2
  out = run_script(tmp_path, '\n\n'.join(code), devices=True)
  losses = ast.literal_eval([ln for ln in out.splitlines() if ln.startswith('[')][-1])
  assert len(losses) == 5 and all(b < a for a, b in zip(losses, losses[1:])), out


def test_multihost_single_host_block_runs():
  """The ```py block of multihost.md (one host), with its `load(lanes)` written out here."""
  (code,) = blocks(DOCS / 'multihost.md', 'py')

  def load(lanes):
    xs = [np.random.RandomState(lane).standard_normal((5, 3)).astype(np.float32)
          for lane in lanes]
    ys = [np.random.RandomState(100 + lane).standard_normal(5).astype(np.float32)
          for lane in lanes]
    return np.stack(xs), np.stack(ys)

  namespace = {'load': load, '__name__': 'multihost_single_host'}
  exec(compile(code, 'docs/multihost.md (py block)', 'exec'), namespace)
  x, y = load(range(8))
  w = np.zeros(3)
  for _ in range(5):
    err = np.einsum('lrf,f->lr', x, w) - y
    w = w - 0.1 * np.mean(2 * np.einsum('lr,lrf->lf', err, x) / 5, axis=0)
  np.testing.assert_allclose(np.asarray(namespace['w'].value), w, rtol=1e-5, atol=1e-6)
