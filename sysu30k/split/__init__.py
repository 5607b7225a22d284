"""``sysu30k split``: the official test split and a held-out val split of a packed DST, built with Dask.

``build`` builds and writes the splits, ``checks`` holds the protocol's invariants, and ``holdout``
chooses the held-out folders and reads them back for the trainers (the only module the loader and the
trainers import from here). May import ``sysu30k.io``, ``sysu30k.release``, the manifest contract and
``sysu30k.ingest.publish`` (the shard summary); nothing downstream.
"""
