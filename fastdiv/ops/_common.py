"""Helpers shared by the op glue files."""
import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forbid_double_backward(ns: str, op: str) -> None:
    """Pullback kernels are first-order only; differentiating through them raises instead of silently
    returning zeros."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ns}::{op} has no derivative: double backward through a fastdiv loss is not supported "
            f"(create_graph=True on the loss's own backward). Use backend='torch' for that.")

    torch.library.register_autograd(f"{ns}::{op}", backward)
