"""docs/multihost.md runs: its ```python blocks, in order, as one program in 2 processes.

The blocks run in one launch of tests/multiprocess.py (2 processes x 4 CPU devices on
127.0.0.1); the first block joins the runtime itself, as a reader's script would. Each block is
one check (its errors are reported, the processes meet after it), so a block that needs engine
work not done yet fails alone. ```py blocks are shown, not run (single-host code); the lines of
each ```text block must be printed by one of the processes.
"""
from __future__ import annotations

import pathlib
import re

import pytest

import multiprocess

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'multihost.md'
FENCE = re.compile(r'^```(\w*)\n(.*?)^```\s*$', re.M | re.S)
# Sections whose blocks rely on the engine's process-aware default mesh (issue 7).
ENGINE_SECTIONS = ('What each process passes and gets back', 'From one host to many')


def parts() -> list[tuple[str, str, str]]:
  """`(kind, section, body)` of every fenced block, in order."""
  text = DOC.read_text()
  out = []
  for match in FENCE.finditer(text):
    headings = re.findall(r'^## (.*)$', text[:match.start()], re.M)
    out.append((match.group(1), headings[-1] if headings else '', match.group(2)))
  return out


def python_blocks() -> list[tuple[str, str]]:
  return [(section, body) for kind, section, body in parts() if kind == 'python']


def needs_engine(section: str) -> bool:
  return section.startswith(ENGINE_SECTIONS)


def _module_source() -> str:
  lines = ['"""The python blocks of docs/multihost.md, one function each (generated)."""',
           f'BLOCKS = {[body for _, body in python_blocks()]!r}',
           "NS = {'__name__': 'multihost_doc'}", '']
  for i in range(len(python_blocks())):
    lines += [f'def block_{i:02d}():',
              f"  exec(compile(BLOCKS[{i}], 'docs/multihost.md python block {i + 1}', 'exec'), NS)",
              '']
  return '\n'.join(lines)


@pytest.fixture(scope='module')
def doc_run(tmp_path_factory):
  def run():
    path = tmp_path_factory.mktemp('multihost-doc') / 'multihost_doc.py'
    path.write_text(_module_source())
    return multiprocess.run_checks(str(path), ('block_',), self_init=True)
  return multiprocess.shared(tmp_path_factory, 'doc', run)


def printed(procs) -> set[str]:
  return {line.rstrip() for p in procs for line in p.stdout.splitlines()
          if not line.startswith(multiprocess.RESULT)}


def block_failures(procs, which) -> list[str]:
  bad = []
  for i in which:
    for p in procs:
      record = p.results.get(f'block_{i:02d}')
      if record is None or 'error' in record:
        why = record['error'] if record else 'not reached'
        bad.append(f'block {i + 1}, process {p.process_id}: {why}\n'
                   f'{(record or {}).get("traceback", "")}')
  return bad


def missing_lines(procs, engine: bool) -> list[str]:
  shown, section_of_last = [], None
  for kind, section, body in parts():
    if kind == 'python':
      section_of_last = section
    elif kind == 'text' and (engine or not needs_engine(section_of_last)):
      shown += body.splitlines()
  out = printed(procs)
  return [line for line in shown if line.rstrip() not in out]


def test_doc_has_the_promised_parts():
  blocks = python_blocks()
  assert len(blocks) >= 6
  assert 'jax.distributed.initialize(' in blocks[0][1]
  text = '\n'.join(body for _, body in blocks)
  for needle in ('pmap2(', 'shard_map(', 'to_global(', 'to_local(', 'local_value(', 'gather(',
                 'assert_same_across_processes(', 'describe('):
    assert needle in text, needle
  sections = {section for section, _ in blocks}
  assert all(any(s.startswith(e) for s in sections) for e in ENGINE_SECTIONS)
  assert 'srun' in DOC.read_text() and '127.0.0.1' in DOC.read_text()


def test_doc_blocks_that_need_no_engine_work_run_in_two_processes(doc_run):
  today = [i for i, (section, _) in enumerate(python_blocks()) if not needs_engine(section)]
  bad = block_failures(doc_run, today)
  assert not bad, '\n'.join(bad) + '\n' + (multiprocess.failure(doc_run) or '')
  missing = missing_lines(doc_run, engine=False)
  assert not missing, f'doc shows {missing}, not printed'


def test_every_doc_block_runs_in_two_processes(doc_run):
  bad = block_failures(doc_run, range(len(python_blocks())))
  assert not bad, '\n'.join(bad)
  assert multiprocess.failure(doc_run) is None
  missing = missing_lines(doc_run, engine=True)
  assert not missing, f'doc shows {missing}, not printed'
