"""Matching models: typed configs (`config`), the name registry (`registry`), modules built by `build`.

Import the submodules directly; this package imports nothing so that the torch-free registry stays light.
"""
