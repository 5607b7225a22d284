"""``sysu30k synth``: deterministic SYSU-30k-shaped datasets, procedural pedestrians in the released layout.

``config`` (what to generate), ``render`` (one pedestrian), ``tree`` (the release-shaped tree and its
truth.csv), ``release`` (that tree packaged as the download: tar parts, lists at the root), ``truth`` (reading
the oracle labels back against a packed DST). Upstream of the pipeline: may import ``sysu30k.io``,
``sysu30k.release`` and the manifest contract, never a stage that reads its output.
"""

from .config import SynthConfig
from .release import ReleaseSummary, package_release
from .render import render_person
from .tree import SynthSummary, write_synth

__all__ = ["ReleaseSummary", "SynthConfig", "SynthSummary", "package_release", "render_person", "write_synth"]
