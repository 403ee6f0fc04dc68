"""mkdocs hooks: the tutorial notebook becomes a page, and snippets resolve from anywhere.

`docs/parallelisation.ipynb` becomes the page `parallelisation.md`, built offline without
Jupyter: markdown cells are copied as they are; each code cell becomes a ```python block
followed by its recorded output (what it printed, or the value it displayed) in a ```text
block. The notebook itself stays in the site for download.

The examples page embeds `docs/examples/*.py` with `pymdownx.snippets`, whose base path is
relative to the working directory; it is made absolute, so `mkdocs build -f PATH` works from
any directory.
"""
from __future__ import annotations

import json
import pathlib

from mkdocs.structure.files import File, Files

NOTEBOOKS = {'parallelisation.ipynb': 'parallelisation.md'}


def _output_text(output: dict) -> str:
  if 'text' in output:
    return ''.join(output['text'])
  return ''.join(output.get('data', {}).get('text/plain', ''))


def notebook_markdown(path: pathlib.Path) -> str:
  """The markdown page of the notebook at `path`."""
  cells = json.loads(path.read_text())['cells']
  parts = []
  for cell in cells:
    source = ''.join(cell['source']).strip('\n')
    if cell['cell_type'] == 'markdown':
      parts.append(source)
    elif cell['cell_type'] == 'code':
      parts.append(f'```python\n{source}\n```')
      shown = ''.join(map(_output_text, cell.get('outputs', []))).rstrip('\n')
      if shown:
        parts.append(f'```text\n{shown}\n```')
  download = path.name
  parts.append(f'*This page is the notebook [`{download}`]({download}), with the output it '
               f'recorded.*')
  return '\n\n'.join(parts) + '\n'


def on_config(config):
  snippets = config['mdx_configs'].get('pymdownx.snippets', {})
  root = pathlib.Path(config['config_file_path']).parent
  snippets['base_path'] = [str(root / p) for p in snippets.get('base_path', [])]
  return config


def on_files(files: Files, config) -> Files:
  docs = pathlib.Path(config['docs_dir'])
  for notebook, page in NOTEBOOKS.items():
    files.append(File.generated(config, page, content=notebook_markdown(docs / notebook)))
  return files
