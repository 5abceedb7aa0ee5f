"""A pure-torch stand-in for peft's BOFT CUDA extension (`fbd_cuda`), so BOFT keeps its butterfly factors.

peft builds its block-diagonal helper as a CUDA extension on first use. Where that cannot be built
(every CPU machine, GPU machines without nvcc/ninja) peft warns and trains BOFT with ONE butterfly
factor, whatever the config says. The extension is tiny: `forward` assembles [N, D, H, H] rotation
blocks into [N, D*H, D*H] block-diagonal matrices and `backward` is its adjoint (the diagonal blocks
of the gradient). Both are written here with a diagonal view, and `ensure_boft_kernel()` puts this
object into peft's module-level cache, only when peft's own extension is unavailable.
"""

from __future__ import annotations

import logging
import warnings

log = logging.getLogger("dcustom.adapters")


class TorchBlockDiag:
    """Same interface as peft's compiled `fbd_cuda` module: `forward(input)` and `backward(grad, input)`
    each return a one-element list, like the extension's `std::vector<at::Tensor>`."""

    name = "dcustom-torch-block-diag"

    @staticmethod
    def forward(blocks):
        import torch

        n, d, h, h2 = blocks.shape
        if h != h2:
            raise ValueError(f"block-diagonal kernel: blocks must be square, got shape {tuple(blocks.shape)}")
        out = torch.zeros(n, d, h, d, h, dtype=blocks.dtype, device=blocks.device)
        # diagonal over the two block axes: [N, H, H, D], a view into `out`
        torch.diagonal(out, dim1=1, dim2=3).copy_(blocks.permute(0, 2, 3, 1))
        return [out.view(n, d * h, d * h)]

    @staticmethod
    def backward(grad_output, blocks):
        import torch

        n, d, h, _ = blocks.shape
        grad = grad_output.reshape(n, d, h, d, h)
        # adjoint of the scatter above: read the same diagonal blocks back, drop everything else
        return [torch.diagonal(grad, dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()]


TORCH_KERNEL = TorchBlockDiag()


def _peft_boft_layer():
    import peft.tuners.boft.layer as boft_layer

    from dcustom.errors import DcustomError

    if not hasattr(boft_layer, "_FBD_CUDA") or not hasattr(boft_layer, "get_fbd_cuda"):
        import peft

        raise DcustomError(f"BOFT: peft {peft.__version__} no longer has the block-diagonal cache "
                           "(peft.tuners.boft.layer._FBD_CUDA) dcustom fills in; accepted: peft 0.21.x.")
    return boft_layer


def boft_kernel_in_use() -> str:
    """'peft-cuda', 'torch' (ours) or 'none' (nothing installed yet: peft would fall back to 1 factor)."""
    cached = _peft_boft_layer()._FBD_CUDA
    if cached is None:
        return "none"
    return "torch" if isinstance(cached, TorchBlockDiag) else "peft-cuda"


def ensure_boft_kernel() -> str:
    """Make peft's BOFT layers use a working block-diagonal kernel; returns 'peft-cuda' or 'torch'.

    Call before any BOFT layer is created (peft reads the kernel while building the layer). Idempotent.
    A working peft CUDA extension is never replaced; peft only tries to build it where CUDA exists.
    """
    import torch

    boft_layer = _peft_boft_layer()
    current = boft_kernel_in_use()
    if current != "none":
        return current
    if torch.cuda.is_available():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's "setting boft_n_butterfly_factor to 1" no longer applies
            if boft_layer.get_fbd_cuda() is not None:
                return "peft-cuda"
    boft_layer._FBD_CUDA = TORCH_KERNEL
    log.info("BOFT: peft's CUDA extension is unavailable; using dcustom's torch block-diagonal kernel.")
    return "torch"
