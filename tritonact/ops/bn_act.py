"""``tritonact::bn_act`` and ``tritonact::bn_act_backward``: one fused BN (+ residual add) + activation unit.

The forward op is functional: it returns the unit's output, its code, and the BN's running statistics after this
batch (the caller copies them into the module's buffers, so the mutation is an ordinary ``copy_`` that autograd,
``torch.compile`` and dispatch modes all see). Its autograd formula saves the code (never the output) and calls the
backward op, which computes every gradient from the code.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from tritonact import backends, escapes, outliers, sync
from tritonact import reference as ref
from tritonact.escaped import bn_act_backward as escaped_backward
from tritonact.quant import memory_order
from tritonact.saved import own, passthrough

__all__ = ["bn_act", "bn_act_backward", "BNActFn", "direct", "DOUBLE_BACKWARD"]

DOUBLE_BACKWARD = (
    "tritonact: double backward (create_graph=True, e.g. a gradient penalty or a Hessian-vector product) through "
    "an approximate unit is not supported, because its backward is computed from k-bit codes; run that step "
    "outside tritonact.approximate"
)


def _empty0(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _res_code(res_data, res_P, res_local, res_shape, res_perm, res_pool, res_act, bits, res_esc=None):
    if res_data is None:
        return None
    return backends.CodeRef(
        res_data, res_P, res_local, tuple(res_shape), tuple(res_perm), bits, res_act, tuple(res_pool), res_esc
    )


def _bn_act(
    y: Tensor,
    gamma: Tensor,
    beta: Tensor,
    residual: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    res_data: Tensor | None,
    res_P: Tensor | None,
    res_local: Tensor | None,
    res_shape: list[int],
    res_perm: list[int],
    res_pool: list[int],
    res_act: str,
    bits: int,
    act: str,
    window: float,
    positive_fraction: float,
    store_xh: bool,
    naive: bool,
    backend: str,
    group: str = "",
    centroids: bool = False,
    edge: float = -1.0,
    res_esc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(out, data, P, invstd, xdata, xP, new_running_mean, new_running_var, esc, xesc)``; ``xdata``/
    ``xP`` (the second code of a join with ``store_xh``) and the running statistics are empty where absent.
    ``res_*``: the residual's code, kept for the backward (the forward adds the exact ``residual``). ``group``: the
    key of the process group a SyncBatchNorm unit takes its batch statistics over (``tritonact.sync``), or ``""``.
    ``centroids``: the grids ``P``/``xP`` carry centroid tables (``tritonact.centroids``). ``edge``: where ``>= 0``,
    ``P``'s bins have edges at the output values ``±edge`` (``reference.code_params``). ``esc``, ``xesc``: the
    codes' escaped values (``tritonact.outliers``; no rows unless a channel has outliers), ``res_esc`` the
    residual code's."""
    return _impl(
        y,
        gamma,
        beta,
        residual,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        bits,
        act,
        window,
        positive_fraction,
        store_xh,
        naive,
        backend,
        group,
        centroids,
        edge,
    )


bn_act = torch.library.custom_op("tritonact::bn_act", _bn_act, mutates_args=())


def _impl(y, gamma, beta, residual, running_mean, running_var, num_batches_tracked, momentum, eps, bits, act,
          window, positive_fraction, store_xh, naive, backend, group, centroids, edge=-1.0, out=None):  # fmt: skip
    if momentum is None:  # cumulative average: the caller has counted this batch already
        eaf = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        eaf = momentum
    be = backends.get(backend)
    stats = sync.global_stats(y, group, eps, eaf, running_mean, running_var) if group else None
    overwrite = out is y  # a join writing into its BN input (overwrites_input): y is gone once out is written
    out, data, P, invstd, xdata, xP, new_rm, new_rv = be.bn_act(
        y,
        gamma,
        beta,
        residual,
        running_mean,
        running_var,
        eaf,
        eps,
        bits=bits,
        act=act,
        window=window,
        pf=positive_fraction,
        store_xh=store_xh,
        out=out,
        stats=stats,
        centroids=centroids,
        edge=edge,
        **({"activate": False} if overwrite else {}),
    )
    esc, xesc = escapes.none(out), escapes.none(out)
    if naive:  # the baseline: later layers compute on the decoded activation
        out = be.decode_act(data, P, bits, tuple(out.shape), memory_order(out), act, out.dtype, out=out)
    elif (flag := outliers.flagged(P)) | (xflag := outliers.flagged(xP)):  # outliers: coded again, escaped
        grid = dict(bits=bits, gamma=gamma.detach().float(), beta=beta.detach().float(), window=window,
                    pf=positive_fraction, cent=centroids, encode=be.encode, stats=be.robust_stats)  # fmt: skip
        xh = None if overwrite else _xh(y, invstd, stats)
        if flag:
            if overwrite:  # (a join without a second code) the sum, before its activation
                w = out.float()
            else:
                w = xh if residual is None else xh * ref.bview(grid["gamma"], y) + ref.bview(grid["beta"], y) + residual
            coded = "xh" if residual is None else "sum"
            data, P, esc = outliers.recode(w, act=act, coded=coded, edge=edge, **grid)
        if xflag:
            xdata, xP, xesc = outliers.recode(xh, act="none", coded="xh", **grid)
    if overwrite and not naive and flag:  # (the backend left the sum for the recode)
        ref.activate_(out, act)
    return (
        out, data, P, invstd,
        xdata if xdata is not None else _empty0(data), xP if xP is not None else _empty0(P),
        new_rm if new_rm is not None else _empty0(invstd), new_rv if new_rv is not None else _empty0(invstd),
        esc, xesc,
    )  # fmt: skip


def _xh(y: Tensor, invstd: Tensor, stats) -> Tensor:
    """The BN's normalized input (fp32, ``y``'s memory order), with the batch mean recomputed (or a
    SyncBatchNorm's global one)."""
    mean = stats[0] if stats is not None else y.mean(dim=ref.channel_dims(y), dtype=torch.float64)
    return (y.float() - ref.bview(mean.float(), y)) * ref.bview(invstd.float(), y)


def _bn_act_fake(y, gamma, beta, residual, running_mean, running_var, num_batches_tracked, momentum, eps, res_data,
                 res_P, res_local, res_shape, res_perm, res_pool, res_act, bits, act, window, positive_fraction,
                 store_xh, naive, backend, group="", centroids=False, edge=-1.0, res_esc=None):  # fmt: skip
    C = y.shape[1]
    rows = ref.PARAM_ROWS + ((1 << bits) if centroids else 0)
    dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
    nbytes = (y.numel() * bits + 7) // 8
    f32 = torch.float32
    return (
        torch.empty_like(y, dtype=dtype),
        y.new_empty(nbytes, dtype=torch.uint8),
        y.new_empty(rows, C, dtype=f32),
        y.new_empty(C, dtype=f32),
        y.new_empty(nbytes if store_xh and residual is not None else 0, dtype=torch.uint8),
        y.new_empty((rows, C) if store_xh and residual is not None else (0,), dtype=f32),
        torch.empty_like(running_mean) if running_mean is not None else y.new_empty(0, dtype=f32),
        torch.empty_like(running_var) if running_var is not None else y.new_empty(0, dtype=f32),
        y.new_empty(torch.library.get_ctx().new_dynamic_size(), 2, dtype=torch.float64),
        y.new_empty(torch.library.get_ctx().new_dynamic_size(), 2, dtype=torch.float64),
    )


bn_act.register_fake(_bn_act_fake)


def _bn_act_into_input(y, gamma, beta, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
                       res_data, res_P, res_local, res_shape, res_perm, res_pool, res_act, bits, act, window,
                       positive_fraction, store_xh, naive, backend, group="", centroids=False, edge=-1.0,
                       res_esc=None):  # fmt: skip
    """``tritonact::bn_act`` writing its output into ``y`` (a join whose BN input nothing else reads, on a backend
    that ``overwrites_input``): returns the other nine outputs (an op may not return an alias of its input)."""
    return _impl(y, gamma, beta, residual, running_mean, running_var, num_batches_tracked, momentum, eps, bits, act,
                 window, positive_fraction, store_xh, naive, backend, group, centroids, edge, out=y)[1:]  # fmt: skip


_bn_act_into_input.__signature__ = inspect.signature(_bn_act).replace(return_annotation=tuple[(Tensor,) * 9])
bn_act_ = torch.library.custom_op("tritonact::bn_act_", _bn_act_into_input, mutates_args=("y",))
bn_act_.register_fake(lambda *args, **kwargs: _bn_act_fake(*args, **kwargs)[1:])


def _setup(ctx, inputs, output):
    (y, gamma, beta, residual, _rm, _rv, _nbt, _mom, _eps, res_data, res_P, res_local, res_shape, res_perm, res_pool,
     res_act, bits, act, _w, _pf, store_xh, _naive, backend, *group) = inputs  # fmt: skip
    res_esc = group[3] if len(group) > 3 else None
    group = group[:1]  # (group, centroids, edge, res_esc) when given
    _out, data, P, invstd, xdata, xP = output[:6]
    saved = [data, P, invstd, gamma, beta, output[8]]
    ctx.mode = "plain"
    if residual is not None:
        if store_xh:
            ctx.mode, saved = "xh", saved + [xdata, xP, output[9]]
        elif res_data is not None:
            ctx.has_res_esc = res_esc is not None
            ctx.mode, saved = "code", saved + [res_data, res_P] + ([res_esc] if res_esc is not None else [])
            saved += [res_local] if res_local is not None else []
        else:
            ctx.mode, saved = "exact", saved + [residual]
        ctx.res_dtype = residual.dtype
    own(P, xP, invstd, output[8], output[9], res_esc)  # grids (with centroid tables), statistics, escapes
    with passthrough():  # an exact residual stays exact (the generic path would code it)
        ctx.save_for_backward(*saved)
    ctx.shape, ctx.perm, ctx.dtype = list(y.shape), list(memory_order(y)), y.dtype
    ctx.bits, ctx.act, ctx.backend, ctx.group = bits, act, backend, (group[0] if group else "")
    ctx.res = (list(res_shape), list(res_perm), list(res_pool), res_act)
    ctx.first_input = 0  # index of y among the inputs autograd sees (BNActFn: 1)
    ctx.set_materialize_grads(False)


def _backward(ctx, g, *_):
    n_in = 27  # the op's inputs, y to res_esc
    if g is None:
        return (None,) * n_in
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(DOUBLE_BACKWARD)
    data, P, invstd, gamma, beta, esc, *rest = ctx.saved_tensors
    xdata = xP = xesc = residual = res_data = res_P = res_local = res_esc = None
    if ctx.mode == "xh":
        xdata, xP, xesc = rest
    elif ctx.mode == "code":
        res_data, res_P, *loc = rest
        if ctx.has_res_esc:
            res_esc, *loc = loc
        res_local = loc[0] if loc else None
    elif ctx.mode == "exact":
        (residual,) = rest
    res_shape, res_perm, res_pool, res_act = ctx.res
    res_dtype = ctx.res_dtype if ctx.mode != "plain" else ctx.dtype
    backend = backends.effective(ctx.backend)
    args = (data, P, gamma, beta, invstd, xdata, xP, residual, res_data, res_P, res_local, res_shape, res_perm,
            res_pool, res_act, ctx.shape, ctx.perm, ctx.bits, ctx.act, ctx.dtype, res_dtype, backend,
            ctx.group, esc, xesc, res_esc)  # fmt: skip
    inplace = _sole_owner(g, ctx.perm, (ctx.dtype, res_dtype), backend)
    if direct():
        g_y, g_gamma, g_beta, g_res = _bn_act_backward(g, *args, inplace=inplace)
    elif inplace:
        g_y, g_gamma, g_beta, g_res = torch.ops.tritonact.bn_act_backward_(g, *args)
        g_y, g_res = (g, g_res) if ctx.mode == "plain" else (g_y, g)
    else:
        g_y, g_gamma, g_beta, g_res = torch.ops.tritonact.bn_act_backward(g, *args)
    need = ctx.needs_input_grad[ctx.first_input :]
    return (
        g_y if need[0] else None,
        g_gamma if need[1] else None,
        g_beta if need[2] else None,
        g_res if ctx.mode != "plain" and need[3] else None,
        *([None] * (n_in - 4)),
    )


bn_act.register_autograd(_backward, setup_context=_setup)


class BNActFn(torch.autograd.Function):
    """``tritonact::bn_act`` with the op's implementation and autograd formula, writing its output into a given
    buffer ``out``: a ring slot (eager only, see :func:`direct`: an op's output cannot alias a buffer it is handed),
    or ``y`` itself (a join whose BN input nothing else reads; through ``tritonact::bn_act_`` inside a dispatch
    mode, so MemTracker sees the op and no new output)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        (y, gamma, beta, residual, rm, rv, nbt, momentum, eps, *_res, bits, act, window, pf, store_xh, naive,
         backend, group, centroids, edge, _res_esc) = inputs  # fmt: skip
        if out is y and not direct():
            outputs = (y, *torch.ops.tritonact.bn_act_(*inputs))
        else:
            outputs = _impl(y, gamma, beta, residual, rm, rv, nbt, momentum, eps, bits, act, window, pf, store_xh,
                            naive, backend, group, centroids, edge, out=out)  # fmt: skip
        if out is y:
            ctx.mark_dirty(y)
        _setup(ctx, inputs, outputs)
        ctx.first_input = 1
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_backward(ctx, *grads))


def direct() -> bool:
    """Whether the ops run directly (``autograd.Function``s around their implementations) rather than through the
    dispatcher: in eager code with no dispatch mode of the user's active. The implementations, saved tensors and
    autograd formulas are the same; the dispatcher's Python path for a custom op costs about 100 us per forward call
    and 300 us per backward (measured, 2-core CPU), about 50 ms per resnet50 step. Under ``torch.compile`` and
    inside a dispatch mode (MemTracker, FlopCounterMode, FakeTensorMode) the ops are called, so those see them."""
    return not torch.compiler.is_compiling() and not backends.user_mode_active()


def _bn_act_backward(
    g: Tensor,
    data: Tensor,
    P: Tensor,
    gamma: Tensor,
    beta: Tensor,
    invstd: Tensor,
    xdata: Tensor | None,
    xP: Tensor | None,
    residual: Tensor | None,
    res_data: Tensor | None,
    res_P: Tensor | None,
    res_local: Tensor | None,
    res_shape: list[int],
    res_perm: list[int],
    res_pool: list[int],
    res_act: str,
    shape: list[int],
    perm: list[int],
    bits: int,
    act: str,
    dtype: torch.dtype,
    res_dtype: torch.dtype,
    backend: str,
    group: str = "",
    esc: Tensor | None = None,
    xesc: Tensor | None = None,
    res_esc: Tensor | None = None,
    inplace: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(g_y, g_gamma, g_beta, g_residual)`` of a unit from ``g = dL/d out`` and its code: ``g_y`` in ``dtype``
    and ``g_residual`` in ``res_dtype``, both dense in memory order ``perm``; ``g_gamma``, ``g_beta`` fp32;
    ``g_residual`` is empty for a unit without a residual add. ``inplace`` (see :func:`_sole_owner`): ``g`` is
    overwritten and returned as ``g_y`` (a join: as ``g_residual``). ``group``: a SyncBatchNorm unit's process
    group key (its sums are all-reduced between the two passes), or ``""``. ``esc``, ``xesc``, ``res_esc``: the
    codes' escaped values (``tritonact.outliers``); where any has some, the torch reference runs the call (the
    residual's code decoded by ``backend``)."""
    shape, perm = tuple(shape), tuple(perm)
    gamma, beta = gamma.detach().float(), beta.detach().float()
    res_code = _res_code(res_data, res_P, res_local, res_shape, res_perm, res_pool, res_act, bits, res_esc)
    reduce = functools.partial(sync.all_reduce_sums, group) if group else None
    escaped = any(escapes.count(e) for e in (esc, xesc, res_esc))
    xh_code = None if xdata is None else (xdata, xP, xesc) if escaped else (xdata, xP)
    out = None
    if escaped:  # on the backend's own backward where it can take them (None: it cannot)
        args = (g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace, reduce)
        out = escaped_backward(backends.get(backend), *args, esc)
    if out is None:  # else the torch reference, which reads them
        out = backends.get("torch" if escaped else backend).bn_act_backward(
            g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace, reduce,
            **({"esc": esc, "decoder": backends.get(backend)} if escaped else {}),
        )  # fmt: skip
    g_y, g_gamma, g_beta, g_res = out
    if g_gamma.untyped_storage().data_ptr() == g_beta.untyped_storage().data_ptr():  # rows of one (2, C) sum
        g_gamma, g_beta = g_gamma.clone(), g_beta.clone()
    g_y = ref.dense_in(g_y, perm, dtype)
    g_res = ref.dense_in(g_res, perm, res_dtype) if g_res is not None else _empty0(g_y, res_dtype)
    return g_y, g_gamma, g_beta, g_res


def _bn_act_backward_functional(g, *args):
    return _bn_act_backward(g, *args)


def _bn_act_backward_inplace(g, *args):
    """:func:`_bn_act_backward` writing ``g_y`` (a join: ``g_residual``) into ``g``; that output comes back empty
    (an op may not return an alias of its input)."""
    g_y, g_gamma, g_beta, g_res = _bn_act_backward(g, *args, inplace=True)
    return (_empty0(g) if g_y is g else g_y), g_gamma, g_beta, (_empty0(g) if g_res is g else g_res)


# both ops take _bn_act_backward's arguments but ``inplace``
_SIG = inspect.signature(_bn_act_backward)
_bn_act_backward_functional.__signature__ = _bn_act_backward_inplace.__signature__ = _SIG.replace(
    parameters=[p for name, p in _SIG.parameters.items() if name != "inplace"]
)
bn_act_backward = torch.library.custom_op("tritonact::bn_act_backward", _bn_act_backward_functional, mutates_args=())
bn_act_backward_ = torch.library.custom_op("tritonact::bn_act_backward_", _bn_act_backward_inplace, mutates_args=("g",))


def _backward_fake(g, data, P, gamma, beta, invstd, xdata, xP, residual, res_data, res_P, res_local, res_shape,
                   res_perm, res_pool, res_act, shape, perm, bits, act, dtype, res_dtype, backend, group="",
                   esc=None, xesc=None, res_esc=None, inplace=False):  # fmt: skip
    C = shape[1]
    joined = residual is not None or res_data is not None or xdata is not None
    g_y = ref.empty_in(shape, perm, dtype, g.device)
    g_res = ref.empty_in(shape, perm, res_dtype, g.device) if joined else g.new_empty(0, dtype=res_dtype)
    if inplace:  # the output that g became comes back empty
        g_y, g_res = (g_y, g.new_empty(0, dtype=res_dtype)) if joined else (g.new_empty(0, dtype=dtype), g_res)
    return g_y, g.new_empty(C, dtype=torch.float32), g.new_empty(C, dtype=torch.float32), g_res


bn_act_backward.register_fake(_backward_fake)
bn_act_backward_.register_fake(functools.partial(_backward_fake, inplace=True))


def _sole_owner(g: Tensor, perm, dtypes, backend: str) -> bool:
    """Whether the unit's backward may overwrite the gradient it is given (InPlace-ABN's trick: one activation-sized
    tensor less at the backward's peak). Autograd's own test for accumulating a gradient in place
    (``can_accumulate_inplace`` in torch/csrc/autograd/input_buffer.cpp): a plain tensor, dense, held by this call
    only, sharing its storage with nothing; and here also in the memory order and dtype the outputs have (fp32 for
    the CPU paths, whose sums run in fp32). Never while ``torch.compile`` traces (its own planner reuses buffers)."""
    if torch.compiler.is_compiling() or not owned(g) or any(d != g.dtype for d in dtypes):
        return False
    if backend != "triton" and g.dtype != torch.float32:
        return False
    return g.permute(tuple(perm)).is_contiguous()


def owned(g: Tensor) -> bool:
    """Whether nothing but the caller holds ``g``: a plain dense tensor that does not require grad, whose storage
    nothing else shares (``can_accumulate_inplace``)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; present in torch 2.1-2.14
    if use_count is None or not hasattr(g, "_use_count") or type(g) is not torch.Tensor or g.requires_grad:
        return False
    if g.layout != torch.strided or not (g.is_contiguous() or g.is_contiguous(memory_format=torch.channels_last)):
        return False
    return g._use_count() == 1 and use_count(g.untyped_storage()._cdata) == 2  # g, and the storage handle here
