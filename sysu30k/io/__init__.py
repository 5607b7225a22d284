"""Input/output and the runtime around it: storage (local or any fsspec URL, atomic writes, retries),
progress bars, the glibc malloc tuning of worker processes, the torchvision import guard, the one
``--device`` rule and the one-writer lock of a dataset root.

The bottom layer: imports nothing from the other subpackages but ``sysu30k.errors``.
"""
