"""A small video model trained on procedural data, shipped with the project."""
