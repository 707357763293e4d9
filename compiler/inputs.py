"""The input dtype rule shared by the compiled model and the ONNX runner (torch-free: the runtime-only install
runs it)."""

from __future__ import annotations

import sys
from typing import Any

from .errors import InputError


def dtype_kind(dtype: Any) -> str:
    """numpy's kind letter of a torch dtype: "f" float, "c" complex, "b" bool, "u"/"i" integer."""
    if dtype.is_floating_point:
        return "f"
    if dtype.is_complex:
        return "c"
    if str(dtype) == "torch.bool":
        return "b"
    return "u" if str(dtype) == "torch.uint8" else "i"


def is_torch_tensor(x: object) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (where torch is not imported, nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_input_dtype(what: str, got: str, got_kind: str, want: str, want_kind: str, expected_by: str) -> None:
    """The input dtype rule of ``cm(x)`` and ``OnnxRunner``: a floating input of another precision (float64,
    float16, bfloat16) is cast to the input's dtype; integer, bool or complex values for a floating input are
    refused, since casting them would hide a wrong array; integer inputs (token ids) take integers (or bool) only,
    cast to their width. Raises :class:`InputError` that names the input and says what to pass."""
    if want_kind == "f":
        ok, advice = got_kind == "f", "pass floating-point values (x.float() in torch, x.astype(np.float32) in numpy)"
    elif want_kind in "iu":
        ok, advice = got_kind in "iub", "pass integer ids"
    else:
        ok, advice = got_kind in "biu", "pass booleans or integers"
    if not ok:
        raise InputError(f"{what} has dtype {got}; {expected_by} {want}: {advice}")
