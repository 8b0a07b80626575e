"""EBRM: an energy network that refines a reward model's scores post hoc (energy, reward model, pipeline)."""
