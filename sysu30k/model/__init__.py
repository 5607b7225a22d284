"""The ReID networks and their checkpoint files: built by the trainers, rebuilt by the evaluator.

``network`` builds a model from its :class:`ModelConfig`; ``checkpoint`` writes and reads checkpoints
(tensors and plain data only, ``weights_only=True``). Sits below both ``sysu30k.train`` and
``sysu30k.evaluation``, so the evaluator never imports the trainer. May import ``sysu30k.io``.
"""

from ..lazy import exports

_WHERE = {
    "ARCHS": "config", "HEADS": "config", "ModelConfig": "config", "build_model": "network"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
