"""The packed parameter directory: tensor-cache.json, params_shard_*.bin and mlc-chat-config.json
(MLC-LLM's and tvmjs' format), and the one check every reader runs on it."""
