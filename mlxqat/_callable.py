"""Modules that share their name with a function of the package (``mlxqat.train``, ``mlxqat.verify``)."""

import sys
import types


def callable_module(name: str, fn) -> None:
    """Make module ``name`` callable as ``fn``.

    ``python -m mlxqat.train`` needs a module of that name, and ``mlxqat.train(...)``
    is a function; importing the module rebinds the package attribute to it, so
    calling the module forwards to the function.
    """

    class _Callable(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[name].__class__ = _Callable
