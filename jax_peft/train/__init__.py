"""Training: optimizer and freezing, jitted data-parallel steps, orbax checkpoints, the loop."""
