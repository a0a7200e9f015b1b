"""The files of a run directory and of one checkpoint directory (single file or DCP shards)."""
