"""One module per group of config families; importing this package registers every adapter.

Every module in this package is imported here, so a new family's module registers itself with
`@adapter` and needs no edit elsewhere.
"""

import importlib
import pkgutil

__all__ = sorted(module.name for module in pkgutil.iter_modules(__path__))
for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")
