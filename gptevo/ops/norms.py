"""Placeholder: filled in by its owner (see spec/README.md)."""
