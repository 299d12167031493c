"""The package version: one place, read by ``mlxqat.__version__``, the manifests and the exporters."""

__version__ = "0.1.0"
