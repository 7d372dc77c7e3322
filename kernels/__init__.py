"""Triton kernels of tritonact (installed as ``tritonact.kernels``).

One file per op family: the ``@triton.jit`` kernels and their launchers. The plain-PyTorch references with the
same contracts live in ``tritonact.quant`` and ``tritonact.reference``.
"""
