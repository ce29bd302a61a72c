"""Retention: which checkpoints to keep (pure policy) and how to delete the rest safely (plan + execute)."""
