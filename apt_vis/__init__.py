"""Extensions of visualize_patches.py: one module per capability beyond the core pipeline."""
