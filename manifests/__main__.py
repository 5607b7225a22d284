"""Print the manifest contract as Markdown: ``python -m sysu30k.manifests > manifests/README.md``."""

from . import markdown

print(markdown(), end="")
