"""Run a notebook's code cells in this process, the way Jupyter shows them; print JSON.

  python tests/nbrun.py NOTEBOOK [--as-brainstate]

Each code cell runs in one shared namespace; its output is what it printed plus the repr of
its last expression (as IPython displays it). `--as-brainstate` runs the seed notebook written
for brainstate against meshstate by changing only its imports.
"""
import ast
import contextlib
import io
import json
import sys


def cell_sources(path: str, as_brainstate: bool) -> list[str]:
  with open(path) as f:
    nb = json.load(f)
  sources = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
  if as_brainstate:
    sources = [s.replace('import brainstate\n', 'import meshstate as brainstate\n')
                .replace('from brainstate.', 'from meshstate.') for s in sources]
  return sources


def run_cell(source: str, namespace: dict) -> str:
  tree = ast.parse(source)
  last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    exec(compile(tree, '<cell>', 'exec'), namespace)
    if last is not None:
      value = eval(compile(ast.Expression(last.value), '<cell>', 'eval'), namespace)
      if value is not None:
        print(repr(value))
  return buf.getvalue()


def main() -> None:
  path, as_brainstate = sys.argv[1], '--as-brainstate' in sys.argv
  namespace = {'__name__': '__main__'}
  outputs = [run_cell(src, namespace) for src in cell_sources(path, as_brainstate)]
  json.dump(outputs, sys.stdout)


if __name__ == '__main__':
  main()
