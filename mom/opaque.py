"""The "reference" and "torch" routed ops as torch.library custom ops, so torch.compile(fullgraph=True)
traces through a model that uses them.

Both ops have data-dependent shapes inside (rows per module), which Dynamo cannot trace without graph breaks
(and Inductor's backward trips over the unbacked sizes). As custom ops they are opaque to the compiler: the
output shape is known ([N, O]), the body runs eagerly. The backward op recomputes the forward under autograd
and differentiates it (one extra forward per backward, only when compiling). The routing plan is rebuilt
inside each op, so a compiled step sorts twice where eager sorts once. The Triton backend has custom ops of
its own (mom_kernels) and does not go through here.

    mom::routed_linear(x [N, D], weight [E, D, O], bias [E, O]?, ids [N, K], weights [N, K]?,
                       ln_weight [E, D]?, ln_bias [E, D]?, eps, impl, norm) -> [N, O]
    mom::routed_ffn(x [N, D], ln_weight, ln_bias?, w1 [E, D, F or 2F], b1?, w2 [E, F, D], b2?, ids, weights, eps,
                    impl, norm, act) -> [N, D]
"""
from __future__ import annotations

import functools
import threading
from contextlib import nullcontext
from typing import List, Optional

import torch
from torch import Tensor

from . import routed

_LINEAR = {"reference": routed.reference_routed_linear, "torch": routed.torch_routed_linear}
_FFN = {"reference": routed.reference_routed_ffn, "torch": routed.torch_routed_ffn}


def _grads(fn, grad, tensors: List[Optional[Tensor]], args_of):
    """Gradients of fn(*args_of(leaves)) w.r.t. every float tensor in `tensors` (empty tensor for None).

    A custom op's body runs with the autograd dispatch keys excluded, so autograd cannot record there; the
    recompute runs in a fresh thread (fresh dispatch state), on the caller's CUDA stream if any."""
    leaves = [None if t is None else (t.detach().requires_grad_() if t.is_floating_point() else t)
              for t in tensors]
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    stream = torch.cuda.current_stream(grad.device) if grad.is_cuda else None
    result, error = [], []

    def work():
        try:
            with torch.enable_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
                out = fn(*args_of(leaves))
                result.extend(torch.autograd.grad(out, wrt, grad, allow_unused=True))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    worker = threading.Thread(target=work, name="mom-opaque-backward")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    got = iter(result)
    res = []
    for t in leaves:
        if t is None or not t.requires_grad:
            res.append(grad.new_empty(0))
        else:
            g = next(got)
            res.append(torch.zeros_like(t) if g is None else g)
    return res


# --- routed_linear ------------------------------------------------------------------------------------------
@torch.library.custom_op("mom::routed_linear", mutates_args=())
def routed_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, weights: Optional[Tensor],
                     ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float, impl: str,
                     norm: str) -> Tensor:
    return _LINEAR[impl](x, weight, bias, ids, weights, ln_weight, ln_bias, eps, norm=norm)


@routed_linear_op.register_fake
def _(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, impl, norm):
    return x.new_empty(x.shape[0], weight.shape[2])


@torch.library.custom_op("mom::routed_linear_backward", mutates_args=())
def routed_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor,
                              weights: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                              eps: float, impl: str, norm: str) -> List[Tensor]:
    # grads of (x, weight, bias, weights, ln_weight, ln_bias); empty where the input is None
    return _grads(functools.partial(_LINEAR[impl], norm=norm), grad, [x, weight, bias, weights, ln_weight, ln_bias],
                  lambda l: (l[0], l[1], l[2], ids, l[3], l[4], l[5], eps))


@routed_linear_backward_op.register_fake
def _(grad, x, weight, bias, ids, weights, ln_weight, ln_bias, eps, impl, norm):
    return [grad.new_empty(0) if t is None else torch.empty_like(t)
            for t in (x, weight, bias, weights, ln_weight, ln_bias)]


def _saver(n_tensors: int):
    """setup_context for an op whose first n_tensors inputs are tensors, then eps, impl, norm (, act)."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])  # (None for absent optional tensors)
        ctx.args = inputs[n_tensors:]
    return setup


def _linear_backward(ctx, grad):
    x, weight, bias, ids, weights, ln_weight, ln_bias = ctx.saved_tensors
    g = routed_linear_backward_op(grad, x, weight, bias, ids, weights, ln_weight, ln_bias, *ctx.args)
    none = lambda t, gr: None if t is None else gr  # noqa: E731
    return (g[0], g[1], none(bias, g[2]), None, none(weights, g[3]), none(ln_weight, g[4]), none(ln_bias, g[5]),
            None, None, None)


routed_linear_op.register_autograd(_linear_backward, setup_context=_saver(7))


# --- routed_ffn ---------------------------------------------------------------------------------------------
@torch.library.custom_op("mom::routed_ffn", mutates_args=())
def routed_ffn_op(x: Tensor, ln_weight: Tensor, ln_bias: Optional[Tensor], w1: Tensor, b1: Optional[Tensor],
                  w2: Tensor, b2: Optional[Tensor], ids: Tensor, weights: Tensor, eps: float, impl: str, norm: str,
                  act: str) -> Tensor:
    return _FFN[impl](x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, norm=norm, act=act)


@routed_ffn_op.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, impl, norm, act):
    return torch.empty_like(x)


@torch.library.custom_op("mom::routed_ffn_backward", mutates_args=())
def routed_ffn_backward_op(grad: Tensor, x: Tensor, ln_weight: Tensor, ln_bias: Optional[Tensor], w1: Tensor,
                           b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], ids: Tensor, weights: Tensor,
                           eps: float, impl: str, norm: str, act: str) -> List[Tensor]:
    # grads of (x, ln_weight, ln_bias, w1, b1, w2, b2, weights); empty where the input is None
    return _grads(functools.partial(_FFN[impl], norm=norm, act=act), grad,
                  [x, ln_weight, ln_bias, w1, b1, w2, b2, weights], lambda l: (*l[:7], ids, l[7], eps))


@routed_ffn_backward_op.register_fake
def _(grad, x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, impl, norm, act):
    return [grad.new_empty(0) if t is None else torch.empty_like(t)
            for t in (x, ln_weight, ln_bias, w1, b1, w2, b2, weights)]


def _ffn_backward(ctx, grad):
    x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights = ctx.saved_tensors
    g = routed_ffn_backward_op(grad, x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, *ctx.args)
    none = lambda t, gr: None if t is None else gr  # noqa: E731
    return (g[0], g[1], none(ln_bias, g[2]), g[3], none(b1, g[4]), g[5], none(b2, g[6]), None, g[7],
            None, None, None, None)


routed_ffn_op.register_autograd(_ffn_backward, setup_context=_saver(9))


# --- the ops object the model uses while compiling ---------------------------------------------------------
def compiled_ops(impl: str) -> "routed.Ops":
    def linear(x, weight, bias, ids, weights=None, ln_weight=None, ln_bias=None, eps=1e-5, plan=None, norm="layer"):
        return routed_linear_op(x, weight, bias, ids, weights, ln_weight, ln_bias, eps, impl, norm)

    def ffn(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps=1e-5, plan=None, norm="layer", act="gelu"):
        return routed_ffn_op(x, ln_weight, ln_bias, w1, b1, w2, b2, ids, weights, eps, impl, norm, act)

    return routed.Ops(impl, lambda ids, n_modules: None, linear, ffn)
