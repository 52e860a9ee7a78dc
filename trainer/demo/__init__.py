"""The embedded default: a synthetic general world, a narrow task and the demo base model."""
