"""The hot path: read input -> dispatch -> write output, with checkpoints."""
