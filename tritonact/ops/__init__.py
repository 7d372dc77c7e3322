"""The ``tritonact::`` operators (``torch.library`` custom ops): what PyTorch sees of the approximate path.

Each op takes tensors and primitives only, has a fake (meta) implementation for tracing (``torch.compile``,
``FakeTensorMode``) and, where it is differentiable, an autograd formula whose saved tensors are codes:

* ``tritonact::bn_act`` / ``tritonact::bn_act_backward``: a fused BN (+ residual add) + activation unit.
* ``tritonact::conv2d``: a convolution that keeps its input's code for the weight gradient.
* ``tritonact::max_pool2d`` / ``tritonact::max_pool2d_backward``: a max-pool that keeps a uint8 argmax.
* ``tritonact::decode``: a code back to the activation its consumers computed from.
* ``tritonact::stem``: a convolution of the network's input, its unit and the max-pool after it; its backward
  computes the convolution again instead of keeping the unit's code.

Which backend computes them is a string argument (:mod:`tritonact.backends`). A second differentiation of any of
them (``create_graph=True``) raises :data:`DOUBLE_BACKWARD`.
"""

from tritonact.ops.bn_act import DOUBLE_BACKWARD, bn_act, bn_act_backward
from tritonact.ops.coded import conv2d, decode, max_pool2d, max_pool2d_backward
from tritonact.ops.stem import stem

__all__ = [
    "bn_act", "bn_act_backward", "conv2d", "decode", "max_pool2d", "max_pool2d_backward", "stem", "DOUBLE_BACKWARD",
]  # fmt: skip
