"""The rollout engine (continuous batching over cache slots) and the weights it samples with."""
