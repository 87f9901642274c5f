"""Matching models (SCAN variants) built from typed configs, selected by name through a registry."""
