"""``sysu30k shard``: the released tree (local or in a bucket) → WebDataset shards, DALI indexes and
Parquet manifests.

``layout`` walks the release and names its images (``keys``); ``plan`` cuts them into shards and
records the bags; ``imageproc`` checks and re-encodes one image; ``tarpack`` writes a tar and its
index; ``packer`` packs one shard; ``publish`` merges the per-shard parts into the manifests; ``shard``
drives it all on local processes or a Dask cluster (one writer per DST: ``sysu30k.io.lock``); ``verify``
checks a finished DST against its manifests. May import ``sysu30k.io``, ``sysu30k.release`` and
the manifest contract (which names DST's layout); nothing downstream.
"""
