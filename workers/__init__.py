"""Ray actors that own model shards on hosts: `workers.shard.ShardWorker` (driven by workers.shards)."""
