"""Files mlxqat reads and writes: where it may write, atomic replacement, the sha256 manifest, saving and
loading mlx-lm directories, and the checks every file passes before MLX reads it.

    destinations.py  the destination rule, atomic writes, repair of killed writes, work directories
    manifest.py      mlxqat.json: the sha256 of every file, what a directory owns
    save.py          an mlx-lm directory with its model card
    load.py          one loader for every model (directory, hub id, GGUF file, the embedded model); verify
    checks.py        config.json, safetensors headers and layer shapes, checked before MLX reads them
"""
