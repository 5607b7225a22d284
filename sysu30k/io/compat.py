"""torchvision on a CPU-only torch: PyPI's torchvision 0.28.0 is a +cu130 build whose C++ ops fail to
load against torch 2.13.0+cpu, and ``import torchvision`` then raises "operator torchvision::nms does not
exist". Defining the two op schemas first lets models and transforms import (ENVIRONMENT.md §1);
torchvision.ops and torchvision.io stay unavailable, so JPEG decoding uses Pillow or DALI.
"""

from __future__ import annotations

import functools
import types


@functools.cache
def import_torchvision() -> types.ModuleType:
    """``import torchvision`` with the op guard applied when the compiled ops did not load."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 (the lookup is the probe: it raises when the ops are missing)
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision._guard = lib      # keep the library object (and its definitions) alive
    import torchvision

    return torchvision
