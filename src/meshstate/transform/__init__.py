"""State-aware transforms: `pmap2`/`vmap2` (one engine, `StatefulMapping`), `jit`, `shard_map`."""
from meshstate.transform._engine import StatefulMapping
from meshstate.transform._map import pmap2, vmap2
from meshstate.transform._jit import jit
from meshstate.transform._shard_map import shard_map, StatefulShardMap

pmap = pmap2
vmap = vmap2

__all__ = ['StatefulMapping', 'StatefulShardMap', 'pmap2', 'pmap', 'vmap2', 'vmap', 'jit',
           'shard_map']
