"""Training of the built-in reference model on the scene world (needs the `train` extra)."""
