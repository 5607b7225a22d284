"""``python -m sysu30k`` runs the command line."""

from .cli import main

main()
