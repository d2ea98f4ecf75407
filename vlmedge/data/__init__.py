"""The synthetic scene world: scenes, captions and questions, deterministic by seed."""
