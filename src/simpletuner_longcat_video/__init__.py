"""LongCat-Video image-to-video model family for SimpleTuner.

Importing this package is cheap on purpose: the interpreter-start hook imports a submodule of
it in every Python process of the environment, so nothing here may pull in torch or the host.
"""

__version__ = "0.1.0"
