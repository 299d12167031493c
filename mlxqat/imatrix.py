"""``python -m mlxqat.imatrix``: computes an importance matrix, :func:`mlxqat.gguf.imatrix.main`.

Only an entry point: importance matrices (collecting, llama.cpp's file formats, the weighted quantizers that
use them) are :mod:`mlxqat.gguf.imatrix`.
"""

if __name__ == "__main__":
    import sys

    from .gguf.imatrix import main

    sys.exit(main())
