"""The published pruning methods, one module per method (or family of variants).

Importing this package imports every module in it, which registers its methods.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
