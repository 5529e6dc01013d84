"""Activations from a model: streamed, or cached on disk and read back in shuffled batches.

Sequences are numbered 0, 1, 2, ... in corpus order and forwarded in batches aligned on multiples of
`batch_size` sequences (the last one filled up too), so a batch holds the same sequences, and so gives
the same numbers, whether a run starts from zero, resumes, or stops at another token count. The
collected positions (all but BOS/EOS/pad unless `keep_special`) form one *stream*; a cache stores
stream positions [0, tokens) in shards of `shard_tokens`.

Cache layout (`OUT/`):

    manifest.json                      what was cached and how; names only complete shards
    tokens/shard-00000.safetensors     token_ids [n] int32, sequence [n] int64, position [n] int32,
                                       sequences [s, context_size] int32, sequence_ids [s] int64
    L03.resid_post/shard-00000.safetensors   activations [n, width] in the cache dtype
    ...

Row i of every file of a shard is the same token: `token_ids[i]` sits at `position[i]` of global
sequence `sequence[i]`, whose full tokens are the row of `sequences` where `sequence_ids` matches, so
any activation traces back to its text. Each shard file is written atomically, then the manifest is
rewritten atomically; a killed run resumes from the first missing shard and ends with exactly the
requested number of tokens.

The modules, in the order data flows through them: `stream` (one forward per batch, every hooked
site), `config` (what a cache run computes), `files` (manifest and shards), `cache` (build or
resume a cache), `reader` (shuffled training batches from a cache or straight from the model).
"""

from gemmascope.activations.cache import build_cache
from gemmascope.activations.config import CacheConfig
from gemmascope.activations.files import read_manifest
from gemmascope.activations.reader import CachedActivations, ModelActivations
from gemmascope.activations.stream import Chunk, activation_stream, prefetch, site_dir

__all__ = [
    "CacheConfig",
    "CachedActivations",
    "Chunk",
    "ModelActivations",
    "activation_stream",
    "build_cache",
    "prefetch",
    "read_manifest",
    "site_dir",
]
