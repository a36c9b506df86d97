"""Procedural tasks with references: a toy one for smoke runs (and, later, the CPU testbed family)."""
