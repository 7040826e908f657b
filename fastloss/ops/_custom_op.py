"""fastloss's torch.library ops, and the eager path around their Python wrapper.

torch.library.custom_op gives torch.compile, fake tensors, tensor subclasses, dispatch modes and functorch one op
with a fake and an autograd formula, but its Python wrapper costs ~0.2 ms a call with autograd on the 2-core CPU:
MNRL at B = 256, D = 256 fp32, forward + backward, took 1.06 ms through the op, 0.85 ms through a
torch.autograd.Function around the same C++ call, which alone takes 0.63 ms. :func:`custom_op` registers the op and
returns an :class:`EagerOp` that runs eager calls on plain tensors as such a Function, with the op's own
implementation, setup_context and backward; everything else goes through the op. Both run the implementation with
the caller's autocast off (:func:`_without_autocast`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PLAIN = (Tensor, torch.nn.Parameter)


def _plain(args: tuple) -> bool:
    """Eager call on real tensors: no compile, fake or meta tensors, subclasses, dispatch modes or functorch."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    for arg in args:
        for x in arg if isinstance(arg, list) else (arg,):
            if isinstance(x, Tensor) and (type(x) not in _PLAIN or x.device.type == "meta"):
                return False
    return True


def _without_autocast(fn: Callable) -> Callable:
    """fn with autocast off: an op computes in its inputs' dtype with fp32 accumulation whatever the caller's autocast
    (under one, ATen's matmuls in the C++ and torch-op paths would run in bf16/fp16: the native MNRL's backward GEMMs,
    the row-block op's, the triplet ops' on CUDA; the Triton kernels never do)."""

    def run(*args):
        devices = [device for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]
        if not devices:
            return fn(*args)
        with contextlib.ExitStack() as stack:
            for device in devices:
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args)

    return run


def _flatten(args: tuple) -> tuple[tuple, list]:
    """(layout, flat): a list argument's length in layout (None for the others) and its tensors in flat, so
    autograd.Function sees each tensor of a list as an input."""
    layout, flat = [], []
    for arg in args:
        if isinstance(arg, list):
            layout.append(len(arg))
            flat.extend(arg)
        else:
            layout.append(None)
            flat.append(arg)
    return tuple(layout), flat


def _unflatten(layout: tuple, flat: tuple) -> list:
    args, i = [], 0
    for n in layout:
        if n is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i : i + n]))
            i += n
    return args


def _eager_function(name: str, fn: Callable, setup_context: Callable, backward: Callable, reads: int) -> type:
    def forward(ctx, layout, *flat):
        # the op's autograd (materialised grads) gives the formula zeros for every output autograd has no gradient
        # for: here only for the first ``reads``, the ones it reads (the others are the outputs it saves, e.g. MNRL's
        # gradients [B, D], whose zero fill per backward would be wasted)
        ctx.set_materialize_grads(False)
        ctx.layout = layout
        args = _unflatten(layout, flat)
        output = fn(*args)
        setup_context(ctx, tuple(args), output)
        ctx.reads = [(x.shape, x.dtype, x.device) for x in output[:reads]]
        return output

    def backward_flat(ctx, *grads):
        grads = list(grads)
        for i, (shape, dtype, device) in enumerate(ctx.reads):
            if grads[i] is None:
                grads[i] = torch.zeros(shape, dtype=dtype, device=device)
        grads_in = backward(ctx, *grads)
        grads_in = grads_in if isinstance(grads_in, tuple) else (grads_in,)
        flat = []
        for n, g in zip(ctx.layout, grads_in):
            if n is None:
                flat.append(g)
            else:
                flat.extend([None] * n if g is None else g)
        return (None, *flat)

    attrs = {"forward": staticmethod(forward), "backward": staticmethod(backward_flat)}
    return type(f"fastloss_{name}", (torch.autograd.Function,), attrs)


class EagerOp:
    """A ``fastloss::<name>`` op (``.op``, for torch.library.opcheck and torch.ops) whose eager calls on plain tensors
    skip the op's wrapper: an autograd.Function when it has a backward, otherwise (a backward op, called by another
    op's backward) the implementation itself while grad mode is off."""

    def __init__(self, name: str, fn: Callable, fake: Callable, setup_context, backward, reads: int) -> None:
        schema = torch.library.infer_schema(fn, mutates_args=())
        fn = _without_autocast(fn)
        self.op = torch.library.custom_op(f"fastloss::{name}", fn, mutates_args=(), schema=schema)
        self.op.register_fake(fake)
        self._fn = fn
        self._function = None
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)
            self._function = _eager_function(name, fn, setup_context, backward, reads)

    def __call__(self, *args):
        if not _plain(args):
            return self.op(*args)
        if self._function is None:
            if torch.is_grad_enabled():  # the op raises a clear error on backward; the bare function would not
                return self.op(*args)
            return self._fn(*args)
        layout, flat = _flatten(args)
        return self._function.apply(layout, *flat)


def custom_op(
    name: str,
    fn: Callable,
    *,
    fake: Callable,
    setup_context: Callable | None = None,
    backward: Callable | None = None,
    reads: int = 1,
) -> EagerOp:
    """Register ``fn`` as ``fastloss::<name>`` (mutates nothing) with its fake and, where given, its autograd formula
    (torch.library.register_autograd's ``backward`` and ``setup_context``); ``fn`` returns a tuple whose first
    ``reads`` outputs are the ones ``backward`` takes the gradient of (it gets None for the others). See
    :class:`EagerOp`."""
    if (backward is None) != (setup_context is None):
        raise ValueError("custom_op: give backward and setup_context together, or neither")
    return EagerOp(name, fn, fake, setup_context, backward, reads)
