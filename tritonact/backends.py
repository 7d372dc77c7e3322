"""The backends that run a unit's work, and the registry that chooses one.

A backend computes the tensors of the ``tritonact::`` ops (:mod:`tritonact.ops`): a unit's forward (BN statistics,
normalize, residual add, activation, codes), its backward from the codes, the decode of a code for a convolution's
weight gradient, and the max-pool index maps. Three are registered:

* ``"torch"``: the plain-PyTorch reference (:mod:`tritonact.reference`), any device; the contract of the others.
* ``"compiled"``: the same formulas compiled by TorchInductor's C++ backend (:mod:`tritonact.compiled`), CPU only.
  Where a shape does not fit its word-level packing it runs the reference for that call.
* ``"triton"``: the Triton kernels (:mod:`tritonact.kernels`), CUDA tensors, or CPU tensors under the interpreter.

:func:`select` picks one for a call site from the user's preference and the tensor's device, once; the ops take its
name (a string, so that only primitives cross an op boundary) and look it up with :func:`get`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tritonact import centroids, escapes, outliers, pool_index
from tritonact import reference as ref
from tritonact.quant import interpreter_enabled, memory_order, resolve_backend, triton_available

__all__ = ["Backend", "CodeRef", "register_backend", "get", "select", "names", "effective", "user_mode_active"]


@dataclass(frozen=True)
class CodeRef:
    """A coded activation as the ops see it: the unit's code (``data``, grid ``P``) of an activation of logical
    ``shape`` dense in memory order ``perm``, and, for a max-pool output, the pool's window-local argmax ``local``
    (``pool_index.pack_local``'s) with its geometry ``pool`` (kernel, stride, padding, dilation, output height and
    width: 10 ints), and the code's escaped values ``esc`` (``tritonact.escapes``; None or no rows: none)."""

    data: torch.Tensor
    P: torch.Tensor
    local: torch.Tensor | None
    shape: tuple
    perm: tuple
    bits: int
    act: str
    pool: tuple = ()
    esc: torch.Tensor | None = None

    @property
    def is_unit(self) -> bool:
        return self.local is None


class Backend:
    """What every backend provides. Subclasses override what they run differently."""

    name = ""
    # Whether ``bn_act`` may write a join's output into its BN input ``y`` (``out is y``) and take
    # ``activate=False``: where ``P`` flags outliers, ``out`` is left before the activation, since the recode of
    # the outliers reads that sum, ``y`` being gone (``tritonact.ops.bn_act``).
    overwrites_input = False

    @staticmethod
    def available(device: torch.device) -> bool:
        raise NotImplementedError

    # -- unit forward --------------------------------------------------------------------------------------
    def bn_act(self, y, gamma, beta, residual, rm, rv, eaf, eps, *, bits, act, window, pf, store_xh, out=None,
               stats=None, centroids=False, edge=-1.0, activate=True):  # fmt: skip
        """``(out, data, P, invstd, xdata, xP, new_rm, new_rv)``: the unit's output (written into ``out`` when
        given), its packed codes and grid, ``1/sigma``, the second code of xh (``None``, ``None`` unless
        ``store_xh``) and the running statistics after this batch (``None`` without them). ``y`` is dense in its
        memory order; ``gamma``, ``beta`` fp32 ``(C,)``; ``eaf`` the BN's exponential average factor. ``stats``:
        the batch statistics computed elsewhere (``tritonact.sync.global_stats``: ``(mean, invstd, new_rm, new_rv,
        var)``), which the unit normalizes with instead of its own batch's. ``centroids``: the grids carry a centroid
        table measured from this batch (``tritonact.centroids``). ``edge``: where ``>= 0``, ``P``'s bins have edges
        at the output values ``±edge`` (``reference.code_params``; ``act == "none"`` only). ``activate=False``
        (backends that declare ``overwrites_input``): where ``P`` flags a channel (``outliers.flagged``), ``out``
        is left holding the pre-activation value and the caller activates it."""
        raise NotImplementedError

    def bn_act_backward(
        self, g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace=False,
        reduce=None,
    ):  # fmt: skip
        """``(g_y, g_gamma, g_beta, g_res)`` (``reference.unit_backward_ref``'s contract); ``residual`` the exact
        residual or None, ``xh_code`` ``(data, P)`` or None, ``res_code`` a :class:`CodeRef` of the residual;
        ``inplace``: ``g`` (fp32, dense in ``perm``) may become ``g_y`` (a join's ``g_res``). ``reduce``: a
        function ``(sum_gz, sum_gzxh, count) -> (sum_gz, sum_gzxh, count)`` of the per-channel sums between the two
        passes (``tritonact.sync.all_reduce_sums``); ``g_gamma``, ``g_beta`` stay the sums before it."""
        raise NotImplementedError

    def decode_act(self, data, P, bits, shape, perm, act, dtype, out=None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, w, P, bits, act, bounds=None) -> torch.Tensor:
        """The packed codes of ``w`` (fp32, dense in its memory order) under ``P``, whose centroid table (if it has
        one) is measured over the samples a unit's own sees (``centroids.sample_limit``), NaN values left out, and
        with ``bounds`` the values outside them too (returned with their mask): ``outliers.encode_ref``'s (the
        recode's last step)."""
        return outliers.encode_ref(w, P, bits, act, bounds)

    def robust_stats(self, w, head, coded):
        """``outliers.robust_stats_ref``'s (the recode's first step)."""
        return outliers.robust_stats_ref(w, head, coded)

    def pool_index(self, direction, t, in_shape, kernel, stride, padding, dilation) -> torch.Tensor:
        f = ref.local_index if direction == "local" else ref.global_index
        return f(t, in_shape, kernel, stride, padding, dilation)

    # -- shared -----------------------------------------------------------------------------------------------
    def decode(self, code: CodeRef, dtype, n0: int | None = None, n1: int | None = None, out=None) -> torch.Tensor:
        """The activation the code's consumers computed from, ``a~``, in ``dtype`` (samples ``[n0, n1)`` only when
        given): a unit's code decoded, or a max-pool output gathered from its input's decoded code."""
        if n0 is None:
            n0, n1 = 0, code.shape[0]
        a = self._decode_unit_range(code, n0, n1, dtype, out if code.is_unit else None)
        if code.is_unit:
            return a
        N, C, H, W = a.shape
        kernel, stride, padding, dilation = (code.pool[i : i + 2] for i in range(0, 8, 2))
        local = pool_index.unpack_local(code.local[n0:n1], kernel, code.pool[9])
        res = torch.empty(local.shape, dtype=a.dtype, device=a.device)
        src = a.reshape(N, C, H * W)
        for m0, m1 in ref.batch_ranges(N, local[0].numel()):  # int64 indices a few samples at a time
            idx = self.pool_index("global", local[m0:m1], (m1 - m0, C, H, W), kernel, stride, padding, dilation)
            torch.gather(src[m0:m1], 2, idx.reshape(m1 - m0, C, -1), out=res[m0:m1].view(m1 - m0, C, -1))
        return res

    def _decode_unit_range(self, code: CodeRef, n0, n1, dtype, out):
        shape, perm, bits = code.shape, code.perm, code.bits

        def act(data, sub, esc, out=None):  # a code's escaped values written over their decoded ones
            a = self.decode_act(data, code.P, bits, sub, perm, code.act, dtype, out=out)
            return escapes.apply_act_(a, code.P, ref.R, code.act, esc, perm)

        if (n0, n1) == (0, shape[0]):
            return act(code.data, shape, code.esc, out)
        per = math.prod(shape[1:])
        if perm[0] != 0 or (n0 * per * bits) % 8:
            return act(code.data, shape, code.esc)[n0:n1]
        data = code.data[n0 * per * bits // 8 : (n1 * per * bits + 7) // 8]
        return act(data, (n1 - n0,) + tuple(shape[1:]), escapes.select(code.esc, n0, n1, shape, perm))


_REGISTRY: dict[str, Backend] = {}


def register_backend(cls):
    """Class decorator: register one instance of a :class:`Backend` under its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown tritonact backend {name!r}; registered: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def select(preference: str | None, device: torch.device, compile: bool = True) -> str:
    """The backend for tensors on ``device``: the user's ``preference`` (``"triton"``, ``"torch"`` or ``None``:
    Triton on CUDA, torch elsewhere), with the torch reference compiled on CPU when ``compile``. Raises a clear
    error where the preferred backend cannot run."""
    if resolve_backend(preference, device) == "triton":  # (the quantizer's choice and errors: one rule for both)
        return "triton"
    if compile and get("compiled").available(device):
        return "compiled"
    return "torch"


def user_mode_active() -> bool:
    """Whether a dispatch mode of the user's (MemTracker, FlopCounterMode, a FakeTensorMode...) is active."""
    if torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(torch._C._get_dispatch_mode(k) is not None for k in torch._C._TorchDispatchModeKey.__members__.values())


def effective(name: str) -> str:
    """The backend to run now for a call site chosen to run ``name``: the eager reference instead of the compiled
    path while a user's dispatch mode is active, so that nothing is traced or compiled inside it. Called where the
    user's mode is still visible: by the call sites before an op, and by the autograd formulas before a backward
    op (inside an op's body a mode that intercepted the op is popped)."""
    if name == "compiled" and not torch.compiler.is_compiling() and user_mode_active():
        return "torch"
    return name


# ----------------------------------------------------------------------------------------------------------
# the torch reference


@register_backend
class TorchBackend(Backend):
    name = "torch"
    overwrites_input = True  # y is read before out is written (native_batch_norm.out is elementwise after the stats)

    @staticmethod
    def available(device: torch.device) -> bool:
        return True

    def bn_act(self, y, gamma, beta, residual, rm, rv, eaf, eps, *, bits, act, window, pf, store_xh, out=None,
               stats=None, centroids=False, edge=-1.0, activate=True):  # fmt: skip
        # BN by the module's own op, so output and running statistics are bit-identical to nn.BatchNorm2d's
        new_rm = rm.clone() if rm is not None else None
        new_rv = rv.clone() if rv is not None else None
        out_dtype = y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)
        if out is None:
            out = torch.empty_like(y, dtype=out_dtype)
        if stats is not None:  # normalized with given statistics: BN's inference formula, with them
            mean, invstd, new_rm, new_rv, var = stats
            z = torch.batch_norm(y, gamma, beta, mean.to(gamma.dtype), var.to(gamma.dtype), False, 0.0, eps, False)
            if residual is not None:
                torch.add(z, residual, out=out)
            else:
                out.copy_(z)
            del z
        elif out_dtype == y.dtype:
            C = y.shape[1]
            mean = torch.empty(C, dtype=gamma.dtype, device=y.device)  # float32, or a float64/16 model's own
            invstd = torch.empty_like(mean)
            torch.ops.aten.native_batch_norm.out(
                y, gamma, beta, new_rm, new_rv, True, eaf, eps, out=out, save_mean=mean, save_invstd=invstd
            )
            mean, invstd = mean.float(), invstd.float()
            if residual is not None:
                out.add_(residual)  # the model's own add, same rounding
        else:
            z, mean, invstd = torch.native_batch_norm(y, gamma, beta, new_rm, new_rv, True, eaf, eps)
            torch.add(z, residual, out=out)
            del z
            mean, invstd = mean.float(), invstd.float()
        data, P, xdata, xP = self._codes(
            y, mean, invstd, gamma, beta, residual, out, bits, act, window, pf, store_xh, centroids, edge
        )
        if activate or not outliers.flagged(P):
            ref.activate_(out, act)
        return out, data, P, invstd, xdata, xP, new_rm, new_rv

    def _codes(self, y, mean, invstd, gamma, beta, residual, s, bits, act, window, pf, store_xh, cent=False, edge=-1.0):
        """``(data, P, xdata, xP)`` of the unit; ``s`` holds the pre-activation value. Made a few samples at a
        time so temporaries stay small."""
        perm = memory_order(y)
        grid = dict(bits=bits, window=window, positive_fraction=pf, gamma=gamma, beta=beta, centroids=cent)
        dims = ref.channel_dims(y)
        bmean, binv = ref.bview(mean, y), ref.bview(invstd, y)
        if residual is None or store_xh:  # xh is monotone in y: its range comes from y's
            xmin = (y.amin(dim=dims).float() - mean) * invstd
            xmax = (y.amax(dim=dims).float() - mean) * invstd
            stats = dict(wmin=xmin, wmax=xmax, wmean=torch.zeros_like(xmin), wstd=torch.ones_like(xmin))
            xh_P = lambda a, e=-1.0: ref.code_params(act=a, coded="xh", edge=e, **stats, **grid)  # noqa: E731
        if residual is not None:
            wmin, wmax, wmean, wstd = ref.value_stats(s if s.dtype == torch.float32 else s.float(), "sum")
            P = ref.code_params(act=act, coded="sum", wmin=wmin, wmax=wmax, wmean=wmean, wstd=wstd, edge=edge, **grid)
            xP = xh_P("none") if store_xh else None
        else:
            P, xP = xh_P(act, edge), None
        data = torch.empty((y.numel() * bits + 7) // 8, dtype=torch.uint8, device=y.device)
        xdata = torch.empty_like(data) if xP is not None else None
        acc = centroids.new_acc(bits, y.shape[1], y.device) if cent else None
        xacc = centroids.new_acc(bits, y.shape[1], y.device) if cent and xP is not None else None
        S = centroids.sample_limit(tuple(y.shape), perm, bits)
        for n0, n1, b0, b1 in ref.sample_chunks(tuple(y.shape), perm, bits):
            k = max(0, min(n1, S) - n0)  # samples of this chunk the centroid statistics see
            if residual is None or store_xh:
                xh = y[n0:n1].float().sub_(bmean) if y.dtype != torch.float32 else (y[n0:n1] - bmean)
                xh.mul_(binv)
            if residual is None:
                data[b0:b1] = ref.encode_ref(xh, P, bits, act, acc, k)
            else:
                data[b0:b1] = ref.encode_ref(s[n0:n1].float(), P, bits, act, acc, k)
                if xdata is not None:
                    xdata[b0:b1] = ref.encode_ref(xh, xP, bits, "none", xacc, k)
        if cent:
            centroids.finish_(P, acc, ref.PARAM_ROWS)
            if xP is not None:
                centroids.finish_(xP, xacc, ref.PARAM_ROWS)
        return data, P, xdata, xP

    def bn_act_backward(
        self, g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace=False,
        reduce=None, esc=None, decoder=None,
    ):  # fmt: skip
        """Also takes the codes' escaped values: ``esc`` (the unit's), a third item of ``xh_code``, ``res_code.esc``;
        ``decoder``: the backend that decodes ``res_code`` (default this one)."""
        if res_code is not None:  # decoded a few samples at a time, inside the chunked backward
            dec = decoder or self
            residual = lambda n0, n1: dec.decode(res_code, torch.float32, n0, n1)  # noqa: E731
        return ref.unit_backward_ref(
            g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, inplace, reduce, esc
        )

    def decode_act(self, data, P, bits, shape, perm, act, dtype, out=None):
        return ref.decode_act_ref(data, P, bits, shape, perm, act, dtype, out=out)


# ----------------------------------------------------------------------------------------------------------
# the torch reference compiled by TorchInductor (CPU)


@register_backend
class CompiledBackend(TorchBackend):
    name = "compiled"

    @staticmethod
    def available(device: torch.device) -> bool:
        from tritonact import compiled

        return compiled.enabled(device)

    def _codes(self, y, mean, invstd, gamma, beta, residual, s, bits, act, window, pf, store_xh, cent=False, edge=-1.0):
        from tritonact import compiled

        perm = memory_order(y)
        kw = dict(bits=bits, window=window, pf=pf, perm=perm, centroids=cent)
        codes = None
        if residual is None:
            codes = compiled.forward_xh(y, mean, invstd, gamma, beta, act=act, edge=edge, **kw)
            codes = None if codes is None else (*codes, None, None)
        else:
            sc = compiled.forward_sum(s, gamma, beta, act=act, edge=edge, **kw)
            xc = compiled.forward_xh(y, mean, invstd, gamma, beta, act="none", **kw) if store_xh else (None, None)
            if sc is not None and xc is not None:
                codes = (*sc, *xc)
        if codes is None:  # a shape the word-level packing does not fit: the reference for this call
            return super()._codes(
                y, mean, invstd, gamma, beta, residual, s, bits, act, window, pf, store_xh, cent, edge
            )
        return codes

    def bn_act_backward(
        self, g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace=False,
        reduce=None,
    ):  # fmt: skip
        from tritonact import compiled

        if reduce is None and compiled.layout3(tuple(shape), tuple(perm), bits) is not None:  # (one graph: no
            # collective inside it)
            rc, key = None, (tuple(shape), tuple(perm), bits)
            if res_code is not None and res_code.is_unit and (res_code.shape, res_code.perm, res_code.bits) == key:
                rc = (res_code.data, res_code.P, res_code.act)  # the residual's own code, decoded in the graph
            elif res_code is not None:
                residual = self.decode(res_code, torch.float32)
            out = compiled.unit_backward(
                g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, residual_code=rc,
                inplace=inplace,
            )  # fmt: skip
            if out is not None:
                return out
            res_code = None if residual is not None else res_code
        return super().bn_act_backward(
            g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace, reduce
        )

    def encode(self, w, P, bits, act, bounds=None):
        from tritonact import compiled

        out = compiled.encode(w, P, bits=bits, act=act, perm=memory_order(w), bounds=bounds)
        return super().encode(w, P, bits, act, bounds) if out is None else out

    def robust_stats(self, w, head, coded):
        from tritonact import compiled

        return compiled.robust_stats(w, head, coded) or super().robust_stats(w, head, coded)

    def decode_act(self, data, P, bits, shape, perm, act, dtype, out=None):
        from tritonact import compiled

        a = compiled.decode_act(data, P, bits, shape, perm, act, dtype)
        if a is None:
            return super().decode_act(data, P, bits, shape, perm, act, dtype, out=out)
        return a if out is None else out.copy_(a)

    def pool_index(self, direction, t, in_shape, kernel, stride, padding, dilation):
        from tritonact import compiled

        out = compiled.pool_index(direction, t, in_shape, kernel, stride, padding, dilation)
        if out is None:
            return super().pool_index(direction, t, in_shape, kernel, stride, padding, dilation)
        return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels


@register_backend
class TritonBackend(Backend):
    name = "triton"
    overwrites_input = True  # the elementwise kernel reads each element of y before it writes it

    @staticmethod
    def available(device: torch.device) -> bool:
        return triton_available() and (device.type == "cuda" or interpreter_enabled())

    def bn_act(self, y, gamma, beta, residual, rm, rv, eaf, eps, *, bits, act, window, pf, store_xh, out=None,
               stats=None, centroids=False, edge=-1.0, activate=True):  # fmt: skip
        from tritonact.kernels.bn_act import bn_act_forward, bn_stats_forward

        gamma, beta = gamma.detach().float(), beta.detach().float()
        if stats is not None:
            mean, invstd, new_rm, new_rv, _ = stats
            dims = ref.channel_dims(y)
            ymin, ymax = y.amin(dim=dims).float(), y.amax(dim=dims).float()
        else:
            mean64, var64, ymin, ymax = bn_stats_forward(y)
            mean, invstd = mean64.float(), (var64 + eps).rsqrt().float()
            new_rm = new_rv = None
        if rm is not None and stats is None:
            n = y.numel() // y.shape[1]
            new_rm = (eaf * mean64 + (1.0 - eaf) * rm.double()).to(rm.dtype)
            new_rv = (eaf * (var64 * (n / max(n - 1, 1))) + (1.0 - eaf) * rv.double()).to(rv.dtype)
        grid = dict(bits=bits, gamma=gamma, beta=beta, window=window, positive_fraction=pf, centroids=centroids)
        # min/max of xh from those of y: (y - mean) * invstd is monotone in y, also after fp32 rounding
        xh_stats = dict(wmin=(ymin - mean) * invstd, wmax=(ymax - mean) * invstd, wmean=torch.zeros_like(mean),
                        wstd=torch.ones_like(mean))  # fmt: skip
        xP = None
        if residual is None:
            P = ref.code_params(act=act, coded="xh", edge=edge, **xh_stats, **grid)
        else:
            smean, svar, smin, smax = bn_stats_forward(y, residual, mean, invstd, gamma, beta)
            P = ref.code_params(act=act, coded="sum", wmin=smin, wmax=smax, wmean=smean.float(),
                                wstd=svar.sqrt().float(), edge=edge, **grid)  # fmt: skip
            if store_xh:
                xP = ref.code_params(act="none", coded="xh", **xh_stats, **grid)
        activate = activate or not outliers.flagged(P)
        out, data, xdata = bn_act_forward(y, residual, mean, invstd, gamma, beta, P, xP, bits, act, out, activate)
        return out, data, P, invstd, xdata, xP, new_rm, new_rv

    def bn_act_backward(
        self, g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, res_code, inplace=False,
        reduce=None,
    ):  # fmt: skip
        from tritonact.kernels.bn_act_bwd import unit_backward

        if res_code is not None:
            residual = self.decode(res_code, torch.float32)
        return unit_backward(
            g, data, P, bits, shape, perm, act, gamma, beta, invstd, residual, xh_code, inplace, reduce=reduce
        )

    def decode_act(self, data, P, bits, shape, perm, act, dtype, out=None):
        from tritonact.kernels.bn_act import decode_act

        a = decode_act(data, P, bits, tuple(shape), tuple(perm), act, dtype)
        return a if out is None else out.copy_(a)
