"""What the SYSU-30k release is: its folder names, counts and protocol constants, and its bags (the
consecutive-folder rule and ``bag_level_label.json``).

Shared by the writer of synthetic releases (``sysu30k.synth``) and their reader (``sysu30k.ingest``), so
neither imports the other. Imports nothing from the other subpackages but ``sysu30k.errors``.
"""
