"""The ReID networks and their checkpoint files: built by the trainers, rebuilt by the evaluator.

``network`` builds a model from its :class:`ModelConfig`; ``checkpoint`` writes and reads checkpoints
(tensors and plain data only, ``weights_only=True``); ``formats`` tells our checkpoints, the official
SYSU-30k model and torchvision ResNet-50 weights apart and hands out the feature ``--feature`` names.
``export`` writes a network as ONNX (``sysu30k export``); ``onnxmodel`` reads and runs such a file.
Sits below both ``sysu30k.train`` and ``sysu30k.evaluation``, so the evaluator never imports the trainer.
May import ``sysu30k.io`` and ``sysu30k.loader`` (export: its normalisation constants).
"""

from ..lazy import exports

_WHERE = {
    "ARCHS": "config", "ExportOptions": "config", "FEATURES": "config", "FORMATS": "config", "HEADS": "config",
    "ModelConfig": "config", "build_model": "network", "detect": "formats", "export_onnx": "export",
    "load_network": "formats", "load_onnx": "onnxmodel"
}
__getattr__ = exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
