"""float64 throughout a transformers model, for tests that must tell round-off from a real difference.

Gradients of gate parameters of gated delta nets (``A_log``, ``dt_bias``) are sums with heavy
cancellation: two exact computations that only sum in another order differ there by 1e-5..1e-4 in
fp32. ``model.double()`` alone does not help: transformers upcasts to float32 on purpose (RMSNorm's
``.to(torch.float32)``, the gates' ``.float()``, routers' ``softmax(dtype=torch.float)``). This keeps
float64 tensors float64 through those casts, for one test (pytest's ``monkeypatch``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: gate parameters whose fp32 gradients are ill-conditioned (checked in float64 instead)
GATE_PARAMETERS = ("A_log", "dt_bias", "in_proj_a")


def float64_everywhere(monkeypatch) -> None:
    to, to_float, softmax = torch.Tensor.to, torch.Tensor.float, F.softmax

    def keep_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("dtype")
        return self if self.dtype == torch.float64 and target is torch.float32 else to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", keep_to)
    # integer tensors cast with .float() (rotary positions in transformers 5.17) become float64 too, so they
    # meet float64 buffers such as inv_freq in a float64 product
    monkeypatch.setattr(torch.Tensor, "float", lambda self, *a, **k: self if self.dtype == torch.float64
                        else to(self, torch.float64) if not self.is_floating_point() and not self.is_complex()
                        else to_float(self, *a, **k))
    monkeypatch.setattr(F, "softmax", lambda x, dim=None, _stacklevel=3, dtype=None: softmax(
        x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype))


def double(model):
    """``model`` in float64, its MoE experts on the eager path (grouped_mm has no float64 kernel)."""
    model = model.double()
    for module in model.modules():
        if hasattr(getattr(module, "config", None), "_experts_implementation"):
            module.config._experts_implementation = "eager"
    return model
