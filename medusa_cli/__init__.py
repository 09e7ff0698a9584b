"""medusa-cli: Medusa speculative-decoding heads from published checkpoints to verified TVM libraries."""

__version__ = "0.1.0"
