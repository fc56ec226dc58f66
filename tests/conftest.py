"""Test session setup.

Without a GPU, Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported by anything in the session (ctxzip.kernels imports it lazily).
"""

from __future__ import annotations

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
