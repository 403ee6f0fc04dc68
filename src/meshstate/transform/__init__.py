"""State-aware transforms: `pmap2`/`vmap2` (one engine, `StatefulMapping`), `jit`, `shard_map`,
autodiff (`grad` family) and control flow (`for_loop`, `scan`, `while_loop`, `cond`, ...)."""
from meshstate.transform._engine import StatefulMapping
from meshstate.transform._map import pmap2, vmap2
from meshstate.transform._jit import jit
from meshstate.transform._shard_map import shard_map, StatefulShardMap
from meshstate.transform._autodiff import grad, value_and_grad, vjp, jacrev, jacfwd
from meshstate.transform._loops import for_loop, scan, while_loop, cond, switch, checkpoint, remat
from meshstate.transform._progress import ProgressBar

pmap = pmap2
vmap = vmap2

__all__ = ['StatefulMapping', 'StatefulShardMap', 'pmap2', 'pmap', 'vmap2', 'vmap', 'jit',
           'shard_map', 'grad', 'value_and_grad', 'vjp', 'jacrev', 'jacfwd', 'for_loop', 'scan',
           'while_loop', 'cond', 'switch', 'checkpoint', 'remat', 'ProgressBar']
