"""The nanoGPT / modded-nanogpt `.bin` token shard format and the splits of a `nas prepare`
folder: constants only, so that `nas prepare` (which writes shards) imports no torch."""

SHARD_MAGIC = 20240520
SHARD_HEADER_INTS = 256  # int32 header: magic, version 1, token count, then zeros
# A folder `nas prepare` wrote holds <split>_NNNNNN.bin shards of these splits.
PREPARED_SPLITS = ("train", "val", "test")
