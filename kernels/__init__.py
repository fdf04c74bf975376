"""Triton kernels and their launchers, shipped as ``fastpeft.kernels``.

Launchers only: no autograd, no ``nn.Module``. The autograd Functions that call them live
in ``fastpeft.ops``. Importing this package never requires triton; each kernel module
imports triton itself and ``fastpeft.ops`` falls back to the reference path when it is
missing.
"""
