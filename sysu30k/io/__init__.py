"""Input/output and the runtime around it: storage (local or any fsspec URL, atomic writes, retries),
progress bars, the glibc malloc tuning of worker processes and the torchvision import guard.

The bottom layer: imports nothing from the other subpackages but ``sysu30k.errors``.
"""
