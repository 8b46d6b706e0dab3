"""The model, sampler and attention in torch + diffusers alone: importable without SimpleTuner.

``tests/test_layout.py`` imports it and runs a forward with ``simpletuner`` made unimportable.
"""
