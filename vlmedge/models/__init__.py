"""Models: the built-in reference VLM (`shapes-vlm`) and loading of checkpoints by name or path."""
