"""Triton kernels behind the ``"triton"`` backend (:mod:`resnet_fast.backends.triton_backend`).

Each module holds one kernel family and its launcher; the launchers take the arguments of the
matching reference op in :mod:`resnet_fast.ops.reference`. Importing this package imports Triton,
so only the backend's ``load()`` does it.
"""
