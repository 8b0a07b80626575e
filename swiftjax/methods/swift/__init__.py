"""SWIFT: a gated linear head over a generator's per-token states (head, features, recipe, pipeline)."""
