"""The batch sizes a library is built for, in a module without numpy so that the CLI can show
the default in its options without paying for numpy at start-up (spec.py re-exports them)."""

# The largest batch a library plans its memory for unless `medusa convert --max-batch-size`
# says otherwise. Written to mlc-chat-config.json, whose value `medusa compile` builds for.
DEFAULT_MAX_BATCH_SIZE = 8
# The most any config, flag or request may ask for.
MAX_BATCH_SIZE = 1 << 16
