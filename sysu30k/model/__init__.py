"""The ReID networks and their checkpoint files: built by the trainers, rebuilt by the evaluator.

``network`` builds a model from its :class:`ModelConfig`; ``checkpoint`` writes and reads checkpoints
(tensors and plain data only, ``weights_only=True``); ``formats`` tells our checkpoints, the official
SYSU-30k model and torchvision ResNet-50 weights apart and hands out the feature ``--feature`` names.
Sits below both ``sysu30k.train`` and ``sysu30k.evaluation``, so the evaluator never imports the trainer.
May import ``sysu30k.io``.
"""

from ..lazy import exports

_WHERE = {
    "ARCHS": "config", "FEATURES": "config", "FORMATS": "config", "HEADS": "config", "ModelConfig": "config",
    "build_model": "network", "detect": "formats", "load_network": "formats"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
