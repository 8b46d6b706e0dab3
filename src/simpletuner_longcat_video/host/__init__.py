"""The host boundary: the only subpackage that imports or patches SimpleTuner.

``discovery`` registers the family, ``patches`` holds every run-time change of the host (one
function each, applied from ``_autoload.HOOKS``), ``fields`` adds the config keys to the host's
field registry, ``settings`` reads the config once, ``family`` is the ``ModelFoundation``
subclass, ``datasets``/``dataset_files`` check the data the host is about to cache, ``faults``
handles failures during a host run. Importing this package imports nothing.
"""
