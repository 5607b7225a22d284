"""Deterministic synthetic SYSU-30k-shaped datasets: procedural pedestrians in the released layout."""

from .config import SynthConfig
from .render import render_person
from .tree import SynthSummary, write_synth

__all__ = ["SynthConfig", "SynthSummary", "render_person", "write_synth"]
