"""docs/migration.md runs: its ```python blocks, in order, in one fresh Python process.

The process gets no XLA_FLAGS (the first block asks for eight CPU devices through
`jax_num_cpu_devices`, as a reader would), `PYTHONPATH=src` and `JAX_PLATFORMS=cpu`. Every
stage checks itself against stage (a); the ```text blocks show output, so each of their lines
must appear in what the process prints.
"""
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / 'docs' / 'migration.md'
FENCE = re.compile(r'^```(\w*)\n(.*?)^```\s*$', re.M | re.S)


def blocks(kind):
  return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == kind]


def test_doc_has_the_five_stages():
  code = blocks('python')
  assert len(code) >= 5
  first = code[0]
  assert first.index('import jax') < first.index("jax.config.update('jax_num_cpu_devices', 8)")
  text = '\n'.join(code)
  for needle in ('jax.pmap(', 'pmap2(', 'mesh=mesh', 'shard_map(', 'jax.jit(', 'NamedSharding',
                 'meshstate.sharding.describe(', '.explain('):
    assert needle in text, needle


def test_python_blocks_run_in_one_process(tmp_path):
  script = tmp_path / 'migration.py'
  script.write_text('\n\n'.join(blocks('python')))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(PYTHONPATH=str(ROOT / 'src'), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  report = f'stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}'
  assert proc.returncode == 0, report
  for stage in 'bcde':
    assert f'stage {stage} matches stage a' in proc.stdout, report
  printed = [ln.rstrip() for ln in proc.stdout.splitlines()]
  for shown in blocks('text'):
    for line in shown.splitlines():
      assert line.rstrip() in printed, f'doc shows {line!r}, not printed\n{report}'
