"""sysu30k: shard, load, train and evaluate on the SYSU-30k person re-identification dataset."""

__version__ = "0.1.0"
