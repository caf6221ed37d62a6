"""PyTensor Op over the likelihood kernels, and the plain-scan reference twin.

:class:`BKTLogLik` maps per-sequence natural parameters to per-sequence
log-likelihoods; its gradient comes from the same numba kernel (forward-mode
sensitivities, :func:`bktbayes.likelihood.forward_logp_grad`). The numba
implementation is registered with PyTensor's numba dispatcher, so a graph
compiled in NUMBA mode (what nutpie uses) calls the kernel directly and never
falls back to ``perform`` in object mode.

:func:`scan_loglik` is the same forward algorithm written as a plain
``pytensor.scan`` over padded sequences: slow, simple, and an independent
reference for the tests and the benchmark.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytensor
import pytensor.tensor as pt
from pytensor.gradient import DisconnectedType, disconnected_type, grad_not_implemented
from pytensor.graph.basic import Apply
from pytensor.graph.op import Op
from pytensor.link.numba.dispatch import basic as numba_basic
from pytensor.link.numba.dispatch.basic import register_funcify_default_op_cache_key

from . import likelihood as likelihood_module
from . import modes as modes_module
from .likelihood import (
    LIKELIHOOD_BLOCK_SIZE,
    forward_logp_grad,
    item_logp_grad,
    prefix_total_logp_grad,
    skill_total_logp_grad,
    student_total_logp_grad,
)
from .modes import collapsed_logp_grad
from .packing import Packed, PrefixLayout

__all__ = [
    "BKTCollapsedLogLik",
    "BKTItemLogLik",
    "BKTLogLik",
    "BKTPrefixLogLik",
    "BKTSkillLogLik",
    "BKTStudentLogLik",
    "bkt_collapsed_loglik",
    "bkt_item_loglik",
    "bkt_loglik",
    "bkt_prefix_loglik",
    "bkt_skill_loglik",
    "bkt_student_loglik",
    "layout_inputs",
    "prefix_inputs",
    "scan_loglik",
]


def _source_salt() -> int:
    """Salt for PyTensor's cache key: a hash of the kernels' source.

    A compiled graph cached on disk embeds the kernels it calls, and numba
    checks only the graph's own source when it loads one; without the salt,
    an edited kernel could keep running its old compiled code.
    """
    h = hashlib.sha256()
    for path in (likelihood_module.__file__, modes_module.__file__, __file__):
        h.update(Path(path).read_bytes())
    return int.from_bytes(h.digest()[:6], "big")


_CACHE_VERSION = _source_salt()
_N_DATA = 5  # correct, block_seq, block_ev, step_ptr, step_count


class _KernelOp(Op):
    """Shared plumbing of the likelihood Ops.

    ``n_data`` leading vector inputs are data (disconnected from the
    gradient); the rest are float64 parameter vectors. Output 0 is the
    log-likelihood, output 1 its first derivatives (row k for parameter k),
    whose product with the cotangent of output 0 is the pullback.
    """

    __props__ = ("forgetting",)
    n_data = _N_DATA

    def __init__(self, forgetting: bool = False) -> None:
        self.forgetting = bool(forgetting)

    def _outputs(self) -> list:
        raise NotImplementedError

    def make_node(self, *inputs):
        n_par = 5 if self.forgetting else 4
        name = type(self).__name__
        if len(inputs) != self.n_data + n_par:
            raise TypeError(f"{name} expects {self.n_data + n_par} inputs, got {len(inputs)}")
        data = [pt.as_tensor_variable(x) for x in inputs[: self.n_data]]
        params = [pt.as_tensor_variable(x).astype("float64") for x in inputs[self.n_data :]]
        for x in (*data, *params):
            if x.ndim != 1:
                raise TypeError(f"{name} inputs must be vectors, got {x.type}")
        return Apply(self, [*data, *params], self._outputs())

    def connection_pattern(self, node):
        n_par = len(node.inputs) - self.n_data
        return [[False, False]] * self.n_data + [[True, True]] * n_par

    def pullback(self, inputs, outputs, cotangents):
        g_value, g_grad = cotangents
        data = [disconnected_type() for _ in range(self.n_data)]
        if not isinstance(g_grad.type, DisconnectedType):
            # Second derivatives are not implemented (NUTS needs first ones).
            return data + [
                grad_not_implemented(self, i, x) for i, x in enumerate(inputs) if i >= self.n_data
            ]
        if isinstance(g_value.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        grad = outputs[1]
        return data + [g_value * grad[k] for k in range(len(inputs) - self.n_data)]


class BKTLogLik(_KernelOp):
    """Per-sequence BKT log-likelihood.

    Inputs: the lockstep data (``correct`` uint8, ``block_seq``, ``block_ev``,
    ``step_ptr`` int64, ``step_count`` int32), then the per-sequence natural
    parameters ``p_init``, ``p_transit``, ``p_guess``, ``p_slip`` (and
    ``p_forget`` when ``forgetting``), each a float64 vector in lockstep
    sequence order.

    Outputs: ``logp`` (n_seqs,) and its derivatives ``grad`` (5, n_seqs)
    with respect to each sequence's parameters. The pullback multiplies the
    cotangent of ``logp`` by ``grad``; the data inputs are disconnected.
    """

    def _outputs(self) -> list:
        return [pt.dvector("logp"), pt.dmatrix("grad")]

    def perform(self, node, inputs, output_storage):
        correct, bseq, bev, sptr, scount, *params = inputs
        logp, grad = _run(correct, bseq, bev, sptr, scount, params, self.forgetting)
        output_storage[0][0] = logp
        output_storage[1][0] = grad

    def infer_shape(self, node, shapes):
        n = shapes[_N_DATA][0]
        return [(n,), (5, n)]


def _run(correct, bseq, bev, sptr, scount, params, forgetting):
    n = params[0].shape[0]
    logp = np.empty(n)
    grad = np.zeros((5, n))
    c = [np.ascontiguousarray(x) for x in (correct, bseq, bev, sptr, scount)]
    p = [np.ascontiguousarray(x, dtype=np.float64) for x in params]
    forward_logp_grad(*c, p[0], p[1], p[2], p[3], p[4] if forgetting else None, logp, grad)
    return logp, grad


@numba_basic.numba_njit
def _kernel_call(correct, bseq, bev, sptr, scount, pi, pt_, pg, ps, pf):
    # PyTensor may hand over non-contiguous views; the kernel is compiled for
    # (and vectorises on) contiguous arrays. ``pf`` is None without forgetting.
    n = pi.shape[0]
    logp = np.empty(n)
    grad = np.zeros((5, n))
    c = np.ascontiguousarray
    forward_logp_grad(
        c(correct),
        c(bseq),
        c(bev),
        c(sptr),
        c(scount),
        c(pi),
        c(pt_),
        c(pg),
        c(ps),
        None if pf is None else c(pf),
        logp,
        grad,
    )
    return logp, grad


@register_funcify_default_op_cache_key(BKTLogLik)
def _numba_funcify_bkt_loglik(op, node=None, **kwargs):
    if op.forgetting:

        @numba_basic.numba_njit
        def bkt_loglik_forget(correct, bseq, bev, sptr, scount, pi, pt_, pg, ps, pf):
            return _kernel_call(correct, bseq, bev, sptr, scount, pi, pt_, pg, ps, pf)

        return bkt_loglik_forget, _CACHE_VERSION

    @numba_basic.numba_njit
    def bkt_loglik(correct, bseq, bev, sptr, scount, pi, pt_, pg, ps):
        return _kernel_call(correct, bseq, bev, sptr, scount, pi, pt_, pg, ps, None)

    return bkt_loglik, _CACHE_VERSION


class _SkillTotalOp(_KernelOp):
    """Ops whose kernel returns the total log-likelihood and fills its
    gradient with respect to per-skill parameters, (5, n_skills); the kernel
    takes the data inputs, then the parameters, then the gradient array."""

    kernel = None  # a numba kernel, as a staticmethod

    def _outputs(self) -> list:
        return [pt.dscalar("logp"), pt.dmatrix("grad")]

    @staticmethod
    def _unpack(data: list) -> list:
        """The kernel's data arguments from the Op's data inputs."""
        return data

    def perform(self, node, inputs, output_storage):
        data = self._unpack([np.ascontiguousarray(x) for x in inputs[: self.n_data]])
        p = [np.ascontiguousarray(x, dtype=np.float64) for x in inputs[self.n_data :]]
        grad = np.zeros((5, p[0].shape[0]))
        pf = p[4] if self.forgetting else None
        total = self.kernel(*data, p[0], p[1], p[2], p[3], pf, grad)
        output_storage[0][0] = np.asarray(total)
        output_storage[1][0] = grad

    def infer_shape(self, node, shapes):
        return [(), (5, shapes[self.n_data][0])]


class BKTSkillLogLik(_SkillTotalOp):
    """Total BKT log-likelihood from per-skill parameters (models without
    per-student effects).

    Inputs: the five lockstep data inputs, ``seq_skill`` (int64, the skill of
    each sequence), then ``p_init``, ``p_transit``, ``p_guess``, ``p_slip``
    (and ``p_forget``) per skill. Outputs: the total (0-d) and its gradient
    (5, n_skills). The gather to sequences and the sum back to skills run
    inside the kernel (:func:`bktbayes.likelihood.skill_total_logp_grad`).
    """

    n_data = _N_DATA + 1
    kernel = staticmethod(skill_total_logp_grad)


@numba_basic.numba_njit
def _skill_kernel_call(correct, bseq, bev, sptr, scount, seq_skill, pi, pt_, pg, ps, pf):
    c = np.ascontiguousarray
    grad = np.zeros((5, pi.shape[0]))
    total = skill_total_logp_grad(
        c(correct),
        c(bseq),
        c(bev),
        c(sptr),
        c(scount),
        c(seq_skill),
        c(pi),
        c(pt_),
        c(pg),
        c(ps),
        None if pf is None else c(pf),
        grad,
    )
    # PyTensor's numba backend wants 0-d outputs as 0-d arrays.
    return np.asarray(total), grad


@register_funcify_default_op_cache_key(BKTSkillLogLik)
def _numba_funcify_bkt_skill_loglik(op, node=None, **kwargs):
    if op.forgetting:

        @numba_basic.numba_njit
        def bkt_skill_loglik_forget(correct, bseq, bev, sptr, scount, sk, pi, pt_, pg, ps, pf):
            return _skill_kernel_call(correct, bseq, bev, sptr, scount, sk, pi, pt_, pg, ps, pf)

        return bkt_skill_loglik_forget, _CACHE_VERSION

    @numba_basic.numba_njit
    def bkt_skill_loglik(correct, bseq, bev, sptr, scount, sk, pi, pt_, pg, ps):
        return _skill_kernel_call(correct, bseq, bev, sptr, scount, sk, pi, pt_, pg, ps, None)

    return bkt_skill_loglik, _CACHE_VERSION


def bkt_skill_loglik(data: list, seq_skill, p_init, p_transit, p_guess, p_slip, p_forget=None):
    """Total log-likelihood (a PyTensor scalar) from per-skill parameters."""
    op = BKTSkillLogLik(forgetting=p_forget is not None)
    params = [p_init, p_transit, p_guess, p_slip] + ([p_forget] if p_forget is not None else [])
    return op(*data, seq_skill, *params)[0]


# The prefix layout's eleven arrays travel as two buffers: nutpie compiles
# one extraction routine per shared variable of a model (about 0.6 s each
# here), so eleven separate shared arrays cost ~5 s of every fit's compile.
# ``ints`` starts with a header of (start, stop) per array, in the order of
# _PREFIX_ARRAYS, into ``ints`` (int arrays, after the header) or ``bytes``
# (the uint8 ones); node weights are sequence counts and travel as int64.
_PREFIX_ARRAYS = (
    ("node_parent", "i"),
    ("node_skill", "i"),
    ("node_y", "b"),
    ("node_w", "i"),
    ("suf_correct", "b"),
    ("suf_block_seq", "i"),
    ("suf_block_ev", "i"),
    ("suf_step_ptr", "i"),
    ("suf_step_count", "i"),
    ("suf_node", "i"),
    ("suf_skill", "i"),
)


def _pack_buffers(arrays: list[np.ndarray], kinds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate 1-d arrays into an int64 buffer (with a header of
    (start, stop) per array) and a uint8 buffer."""
    n = len(arrays)
    header = np.zeros(2 * n, dtype=np.int64)
    ints, bts = [header], []
    pos = {"i": 2 * n, "b": 0}
    for k, (a, kind) in enumerate(zip(arrays, kinds, strict=True)):
        a = np.asarray(a)
        if kind == "i":
            b = a.astype(np.int64)
            if not np.array_equal(b, a):
                raise ValueError(f"array {k} does not hold integers")
            ints.append(b)
        else:
            bts.append(a.astype(np.uint8))
        header[2 * k] = pos[kind]
        pos[kind] += len(a)
        header[2 * k + 1] = pos[kind]
    cat_b = np.concatenate(bts) if bts else np.zeros(0, np.uint8)
    return np.concatenate(ints), cat_b


def _unpack_buffers(ints: np.ndarray, bts: np.ndarray, kinds) -> list[np.ndarray]:
    return [
        (ints if kind == "i" else bts)[ints[2 * k] : ints[2 * k + 1]]
        for k, kind in enumerate(kinds)
    ]


class BKTPrefixLogLik(_SkillTotalOp):
    """Total BKT log-likelihood from per-skill parameters, prefixes shared.

    The same value and gradient as :class:`BKTSkillLogLik`, computed on the
    prefix-trie layout (:class:`bktbayes.packing.PrefixLayout`): sequences of
    a skill that start with the same responses share those steps.

    Inputs: the layout as two buffers from :func:`prefix_inputs` (``ints``,
    int64, and ``bytes``, uint8), then ``p_init``, ``p_transit``,
    ``p_guess``, ``p_slip`` (and ``p_forget``) per skill. Outputs: the total
    (0-d) and its gradient (5, n_skills).
    """

    n_data = 2
    kernel = staticmethod(prefix_total_logp_grad)

    @staticmethod
    def _unpack(data: list) -> list:
        return _unpack_buffers(data[0], data[1], [k for _, k in _PREFIX_ARRAYS])


@numba_basic.numba_njit
def _seg(buf, hdr, k):
    return buf[hdr[2 * k] : hdr[2 * k + 1]]


@numba_basic.numba_njit
def _prefix_kernel_call(ints, bts, pi, pt_, pg, ps, pf):
    c = np.ascontiguousarray
    ints = c(ints)
    bts = c(bts)
    grad = np.zeros((5, pi.shape[0]))
    # Segments in the order of _PREFIX_ARRAYS.
    total = prefix_total_logp_grad(
        _seg(ints, ints, 0),
        _seg(ints, ints, 1),
        _seg(bts, ints, 2),
        _seg(ints, ints, 3),
        _seg(bts, ints, 4),
        _seg(ints, ints, 5),
        _seg(ints, ints, 6),
        _seg(ints, ints, 7),
        _seg(ints, ints, 8),
        _seg(ints, ints, 9),
        _seg(ints, ints, 10),
        c(pi),
        c(pt_),
        c(pg),
        c(ps),
        None if pf is None else c(pf),
        grad,
    )
    return np.asarray(total), grad


@register_funcify_default_op_cache_key(BKTPrefixLogLik)
def _numba_funcify_bkt_prefix_loglik(op, node=None, **kwargs):
    if op.forgetting:

        @numba_basic.numba_njit
        def bkt_prefix_loglik_forget(ints, bts, pi, pt_, pg, ps, pf):
            return _prefix_kernel_call(ints, bts, pi, pt_, pg, ps, pf)

        return bkt_prefix_loglik_forget, _CACHE_VERSION

    @numba_basic.numba_njit
    def bkt_prefix_loglik(ints, bts, pi, pt_, pg, ps):
        return _prefix_kernel_call(ints, bts, pi, pt_, pg, ps, None)

    return bkt_prefix_loglik, _CACHE_VERSION


def prefix_inputs(layout: PrefixLayout, *, shared: bool = True) -> list:
    """The data inputs of :class:`BKTPrefixLogLik` for a prefix layout: two
    buffers (``pytensor.shared`` variables, or arrays with ``shared=False``)."""
    sp = layout.suffix
    by_name = {
        "node_parent": layout.node_parent,
        "node_skill": layout.node_skill,
        "node_y": layout.node_y,
        "node_w": layout.node_w,
        "suf_correct": sp.lock_correct,
        "suf_block_seq": sp.block_seq,
        "suf_block_ev": sp.block_ev,
        "suf_step_ptr": sp.step_ptr,
        "suf_step_count": sp.step_count,
        "suf_node": layout.suf_node,
        "suf_skill": layout.suf_skill,
    }
    ints, bts = _pack_buffers(
        [by_name[n] for n, _ in _PREFIX_ARRAYS], [k for _, k in _PREFIX_ARRAYS]
    )
    if not shared:
        return [ints, bts]
    return [
        pytensor.shared(ints, name="bkt_prefix_ints"),
        pytensor.shared(bts, name="bkt_prefix_bytes"),
    ]


def bkt_prefix_loglik(data: list, p_init, p_transit, p_guess, p_slip, p_forget=None):
    """Total log-likelihood (a PyTensor scalar) from per-skill parameters,
    on the prefix layout (``data`` from :func:`prefix_inputs`)."""
    op = BKTPrefixLogLik(forgetting=p_forget is not None)
    params = [p_init, p_transit, p_guess, p_slip] + ([p_forget] if p_forget is not None else [])
    return op(*data, *params)[0]


class BKTStudentLogLik(Op):
    """Total BKT log-likelihood with per-student offsets (Yudelson et al. 2013).

    Inputs: the five lockstep data inputs, ``seq_skill`` and ``seq_user``
    (int64 per sequence), then ``init_logit`` (per skill), ``init_offset``
    (per student), ``transit_logit`` (per skill), ``transit_offset`` (per
    student; zeros without transit offsets), ``p_guess``, ``p_slip`` (per
    skill) and, with ``forgetting``, ``forget_share`` (per skill; P(F) is
    ``(1 - P(T)) forget_share``). Outputs: the total (0-d), its gradient with
    respect to the per-skill inputs (5, n_skills) and to the per-student ones
    (2, n_users), from :func:`bktbayes.likelihood.student_total_logp_grad`.

    The gathers, logistic maps and scatters run inside the kernel; as a dozen
    graph operations over every sequence around :class:`BKTLogLik` they made
    the model's log-density and gradient about 12% slower
    (``benchmarks/bench_likelihood.py``: 4.30 against 3.82 ns per observation).
    """

    __props__ = ("forgetting",)
    n_data = _N_DATA + 2
    _SKILL_ROW = (0, None, 1, None, 2, 3, 4)  # gradient row of each parameter input
    _USER_ROW = (None, 0, None, 1, None, None, None)

    def __init__(self, forgetting: bool = False) -> None:
        self.forgetting = bool(forgetting)

    def make_node(self, *inputs):
        n_par = 7 if self.forgetting else 6
        if len(inputs) != self.n_data + n_par:
            raise TypeError(
                f"BKTStudentLogLik expects {self.n_data + n_par} inputs, got {len(inputs)}"
            )
        data = [pt.as_tensor_variable(x) for x in inputs[: self.n_data]]
        params = [pt.as_tensor_variable(x).astype("float64") for x in inputs[self.n_data :]]
        for x in (*data, *params):
            if x.ndim != 1:
                raise TypeError(f"BKTStudentLogLik inputs must be vectors, got {x.type}")
        outputs = [pt.dscalar("logp"), pt.dmatrix("grad_skill"), pt.dmatrix("grad_user")]
        return Apply(self, [*data, *params], outputs)

    def connection_pattern(self, node):
        n_par = len(node.inputs) - self.n_data
        return [[False] * 3] * self.n_data + [[True] * 3] * n_par

    def pullback(self, inputs, outputs, cotangents):
        g_value, g_skill, g_user = cotangents
        data = [disconnected_type() for _ in range(self.n_data)]
        if not all(isinstance(g.type, DisconnectedType) for g in (g_skill, g_user)):
            return data + [
                grad_not_implemented(self, i, x) for i, x in enumerate(inputs) if i >= self.n_data
            ]
        if isinstance(g_value.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        out = list(data)
        for k in range(len(inputs) - self.n_data):
            if self._SKILL_ROW[k] is not None:
                out.append(g_value * outputs[1][self._SKILL_ROW[k]])
            else:
                out.append(g_value * outputs[2][self._USER_ROW[k]])
        return out

    def perform(self, node, inputs, output_storage):
        data = [np.ascontiguousarray(x) for x in inputs[: self.n_data]]
        p = [np.ascontiguousarray(x, dtype=np.float64) for x in inputs[self.n_data :]]
        g_skill = np.zeros((5, p[0].shape[0]))
        g_user = np.zeros((2, p[1].shape[0]))
        pf = p[6] if self.forgetting else None
        total = student_total_logp_grad(*data, *p[:6], pf, g_skill, g_user)
        output_storage[0][0] = np.asarray(total)
        output_storage[1][0] = g_skill
        output_storage[2][0] = g_user

    def infer_shape(self, node, shapes):
        return [(), (5, shapes[self.n_data][0]), (2, shapes[self.n_data + 1][0])]


@numba_basic.numba_njit
def _student_kernel_call(correct, bseq, bev, sptr, scount, sk, su, li, lo, ti, to, pg, ps, pf):
    c = np.ascontiguousarray
    g_skill = np.zeros((5, li.shape[0]))
    g_user = np.zeros((2, lo.shape[0]))
    total = student_total_logp_grad(
        c(correct),
        c(bseq),
        c(bev),
        c(sptr),
        c(scount),
        c(sk),
        c(su),
        c(li),
        c(lo),
        c(ti),
        c(to),
        c(pg),
        c(ps),
        None if pf is None else c(pf),
        g_skill,
        g_user,
    )
    return np.asarray(total), g_skill, g_user


@register_funcify_default_op_cache_key(BKTStudentLogLik)
def _numba_funcify_bkt_student_loglik(op, node=None, **kwargs):
    if op.forgetting:

        @numba_basic.numba_njit
        def bkt_student_loglik_forget(a, b, c, d, e, sk, su, li, lo, ti, to, pg, ps, pf):
            return _student_kernel_call(a, b, c, d, e, sk, su, li, lo, ti, to, pg, ps, pf)

        return bkt_student_loglik_forget, _CACHE_VERSION

    @numba_basic.numba_njit
    def bkt_student_loglik(a, b, c, d, e, sk, su, li, lo, ti, to, pg, ps):
        return _student_kernel_call(a, b, c, d, e, sk, su, li, lo, ti, to, pg, ps, None)

    return bkt_student_loglik, _CACHE_VERSION


def bkt_student_loglik(
    data: list,
    seq_skill,
    seq_user,
    init_logit,
    init_offset,
    transit_logit,
    transit_offset,
    p_guess,
    p_slip,
    forget_share=None,
):
    """Total log-likelihood (a PyTensor scalar) with per-student offsets on
    the logits of P(L0) and P(T); see :class:`BKTStudentLogLik`."""
    op = BKTStudentLogLik(forgetting=forget_share is not None)
    params = [init_logit, init_offset, transit_logit, transit_offset, p_guess, p_slip]
    if forget_share is not None:
        params.append(forget_share)
    return op(*data, seq_skill, seq_user, *params)[0]


class BKTItemLogLik(_KernelOp):
    """Total BKT log-likelihood with item-level guess and slip (KT-IDEM).

    Inputs: the five lockstep data inputs, ``ev_item`` (int64, the item of
    each response in lockstep order), then ``p_init`` and ``p_transit`` per
    sequence, ``p_guess`` and ``p_slip`` per item (and ``p_forget`` per
    sequence). Outputs: the total (0-d), its gradient with respect to the
    per-sequence parameters (3, n_seqs: init, transit, forget) and to the
    per-item parameters (2, n_items: guess, slip), from
    :func:`bktbayes.likelihood.item_logp_grad` (forward pass and backward
    adjoints).
    """

    n_data = _N_DATA + 1

    def _outputs(self) -> list:
        return [pt.dscalar("logp"), pt.dmatrix("grad_seq"), pt.dmatrix("grad_item")]

    def connection_pattern(self, node):
        n_par = len(node.inputs) - self.n_data
        return [[False, False, False]] * self.n_data + [[True, True, True]] * n_par

    def pullback(self, inputs, outputs, cotangents):
        g_value, g_seq, g_item = cotangents
        data = [disconnected_type() for _ in range(self.n_data)]
        params = inputs[self.n_data :]
        if not all(isinstance(g.type, DisconnectedType) for g in (g_seq, g_item)):
            return data + [
                grad_not_implemented(self, self.n_data + i, x) for i, x in enumerate(params)
            ]
        if isinstance(g_value.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        gs, gi = outputs[1], outputs[2]
        out = [g_value * gs[0], g_value * gs[1], g_value * gi[0], g_value * gi[1]]
        if self.forgetting:
            out.append(g_value * gs[2])
        return data + out

    def perform(self, node, inputs, output_storage):
        *data, ev_item = (np.ascontiguousarray(x) for x in inputs[: self.n_data])
        p = [np.ascontiguousarray(x, dtype=np.float64) for x in inputs[self.n_data :]]
        logp = np.empty(p[0].shape[0])
        gseq = np.zeros((3, p[0].shape[0]))
        gitem = np.zeros((2, p[2].shape[0]))
        pf = p[4] if self.forgetting else None
        item_logp_grad(*data, ev_item, p[0], p[1], p[2], p[3], pf, logp, gseq, gitem)
        output_storage[0][0] = np.asarray(logp.sum())
        output_storage[1][0] = gseq
        output_storage[2][0] = gitem

    def infer_shape(self, node, shapes):
        return [(), (3, shapes[self.n_data][0]), (2, shapes[self.n_data + 2][0])]


@numba_basic.numba_njit
def _item_kernel_call(correct, bseq, bev, sptr, scount, ev_item, pi, pt_, pg, ps, pf):
    c = np.ascontiguousarray
    logp = np.empty(pi.shape[0])
    gseq = np.zeros((3, pi.shape[0]))
    gitem = np.zeros((2, pg.shape[0]))
    item_logp_grad(
        c(correct),
        c(bseq),
        c(bev),
        c(sptr),
        c(scount),
        c(ev_item),
        c(pi),
        c(pt_),
        c(pg),
        c(ps),
        None if pf is None else c(pf),
        logp,
        gseq,
        gitem,
    )
    return np.asarray(logp.sum()), gseq, gitem


@register_funcify_default_op_cache_key(BKTItemLogLik)
def _numba_funcify_bkt_item_loglik(op, node=None, **kwargs):
    if op.forgetting:

        @numba_basic.numba_njit
        def bkt_item_loglik_forget(correct, bseq, bev, sptr, scount, ei, pi, pt_, pg, ps, pf):
            return _item_kernel_call(correct, bseq, bev, sptr, scount, ei, pi, pt_, pg, ps, pf)

        return bkt_item_loglik_forget, _CACHE_VERSION

    @numba_basic.numba_njit
    def bkt_item_loglik(correct, bseq, bev, sptr, scount, ei, pi, pt_, pg, ps):
        return _item_kernel_call(correct, bseq, bev, sptr, scount, ei, pi, pt_, pg, ps, None)

    return bkt_item_loglik, _CACHE_VERSION


def bkt_item_loglik(data: list, ev_item, p_init, p_transit, item_guess, item_slip, p_forget=None):
    """Total log-likelihood (a PyTensor scalar) with item-level guess and slip.

    ``p_init``, ``p_transit`` (and ``p_forget``) per sequence, ``item_guess``
    and ``item_slip`` per item; ``ev_item`` the item of each response in
    lockstep order.
    """
    op = BKTItemLogLik(forgetting=p_forget is not None)
    params = [p_init, p_transit, item_guess, item_slip]
    params += [p_forget] if p_forget is not None else []
    return op(*data, ev_item, *params)[0]


def layout_inputs(packed: Packed, *, shared: bool = True) -> list:
    """The five data inputs of :class:`BKTLogLik` for a packed data set.

    Parameters
    ----------
    packed : Packed
        Must carry the responses (``pack_codes(..., correct)``).
    shared : bool
        Wrap them as ``pytensor.shared`` variables (keeps compiled graphs
        cacheable: the data are not baked in as constants).
    """
    if packed.lock_correct is None:
        raise ValueError("packed events carry no responses")
    if packed.block_size > LIKELIHOOD_BLOCK_SIZE:
        raise ValueError(
            f"pack with block_size <= {LIKELIHOOD_BLOCK_SIZE} for the likelihood kernel "
            f"(got {packed.block_size})"
        )
    arrays = [
        packed.lock_correct.astype(np.uint8),
        packed.block_seq.astype(np.int64),
        packed.block_ev.astype(np.int64),
        packed.step_ptr.astype(np.int64),
        packed.step_count.astype(np.int32),
    ]
    names = ["bkt_correct", "bkt_block_seq", "bkt_block_ev", "bkt_step_ptr", "bkt_step_count"]
    if not shared:
        return arrays
    return [pytensor.shared(a, name=n, borrow=True) for a, n in zip(arrays, names, strict=True)]


def bkt_loglik(data: list, p_init, p_transit, p_guess, p_slip, p_forget=None):
    """Per-sequence log-likelihood (a PyTensor vector) from per-sequence parameters."""
    op = BKTLogLik(forgetting=p_forget is not None)
    params = [p_init, p_transit, p_guess, p_slip] + ([p_forget] if p_forget is not None else [])
    return op(*data, *params)[0]


def scan_loglik(correct_padded, mask, p_init, p_transit, p_guess, p_slip, p_forget=None):
    """The forward algorithm as a plain ``pytensor.scan`` (the slow twin).

    Parameters
    ----------
    correct_padded : int matrix, shape (max_len, n_seqs)
        Responses, time-major, padded.
    mask : float matrix, shape (max_len, n_seqs)
        1 for real responses, 0 for padding.
    p_init, p_transit, p_forget : vectors, shape (n_seqs,)
    p_guess, p_slip : vectors, shape (n_seqs,), or matrices (max_len, n_seqs)
        Per sequence, or per response (time-major, as ``correct_padded``) for
        item-level guess and slip.

    Returns
    -------
    Vector (n_seqs,): per-sequence log-likelihood.
    """
    correct_padded = pt.as_tensor_variable(correct_padded)
    mask = pt.as_tensor_variable(mask)
    p_guess = pt.as_tensor_variable(p_guess)
    p_slip = pt.as_tensor_variable(p_slip)
    f = pt.zeros_like(p_init) if p_forget is None else p_forget
    per_event = p_guess.ndim == 2

    def step(y, m, *args):
        if per_event:
            guess, slip, p, q, ll, transit, forget = args
        else:
            p, q, ll, slip, guess, transit, forget = args
        a = pt.switch(pt.eq(y, 1), 1.0 - slip, slip)
        b = pt.switch(pt.eq(y, 1), guess, 1.0 - guess)
        lik = p * a + q * b
        pp = p * a / lik
        pq = q * b / lik
        p_new = pp * (1.0 - forget) + pq * transit
        q_new = pp * forget + pq * (1.0 - transit)
        keep = pt.eq(m, 1)
        return (
            pt.switch(keep, p_new, p),
            pt.switch(keep, q_new, q),
            ll + m * pt.log(lik),
        )

    seqs = [correct_padded, mask] + ([p_guess, p_slip] if per_event else [])
    consts = [p_transit, f] if per_event else [p_slip, p_guess, p_transit, f]
    outs = pytensor.scan(
        step,
        sequences=seqs,
        outputs_info=[p_init, 1.0 - p_init, pt.zeros_like(p_init)],
        non_sequences=consts,
        return_updates=False,
    )
    return outs[2][-1]


class BKTCollapsedLogLik(Op):
    """Collapsed skills' likelihood, their logits integrated out
    (:func:`bktbayes.modes.collapsed_logp_grad`), as a function of the
    population.

    Inputs: ``nodes_t`` (n_par, n_nodes), ``c`` (n_nodes,) and ``start``
    (int64, n_skills + 1) are data; ``mean`` and ``sd`` (n_par,) the
    population means and scales of the logits. Outputs: the total (0-d) and
    its gradient (2, n_par), rows for ``mean`` and ``sd``.
    """

    __props__ = ()

    def make_node(self, nodes_t, c, start, mean, sd):
        data = [pt.as_tensor_variable(nodes_t), pt.as_tensor_variable(c)]
        data.append(pt.as_tensor_variable(start))
        params = [pt.as_tensor_variable(x).astype("float64") for x in (mean, sd)]
        if data[0].ndim != 2 or data[1].ndim != 1 or data[2].ndim != 1:
            raise TypeError("BKTCollapsedLogLik: nodes_t must be a matrix, c and start vectors")
        for x in params:
            if x.ndim != 1:
                raise TypeError(f"BKTCollapsedLogLik: mean and sd must be vectors, got {x.type}")
        return Apply(self, [*data, *params], [pt.dscalar("logp"), pt.dmatrix("grad")])

    def connection_pattern(self, node):
        return [[False, False]] * 3 + [[True, True]] * 2

    def pullback(self, inputs, outputs, cotangents):
        g_value, g_grad = cotangents
        data = [disconnected_type() for _ in range(3)]
        if not isinstance(g_grad.type, DisconnectedType):
            return data + [grad_not_implemented(self, i, inputs[i]) for i in (3, 4)]
        if isinstance(g_value.type, DisconnectedType):
            return [disconnected_type() for _ in inputs]
        grad = outputs[1]
        return [*data, g_value * grad[0], g_value * grad[1]]

    def perform(self, node, inputs, output_storage):
        nodes_t, c, start, mean, sd = (np.ascontiguousarray(x) for x in inputs)
        grad = np.empty((2, mean.shape[0]))
        total = collapsed_logp_grad(
            nodes_t.astype(np.float64),
            c.astype(np.float64),
            start.astype(np.int64),
            mean.astype(np.float64),
            sd.astype(np.float64),
            grad,
        )
        output_storage[0][0] = np.asarray(total)
        output_storage[1][0] = grad

    def infer_shape(self, node, shapes):
        return [(), (2, shapes[3][0])]


@register_funcify_default_op_cache_key(BKTCollapsedLogLik)
def _numba_funcify_bkt_collapsed_loglik(op, node=None, **kwargs):
    @numba_basic.numba_njit
    def bkt_collapsed_loglik(nodes_t, c, start, mean, sd):
        a = np.ascontiguousarray
        grad = np.empty((2, mean.shape[0]))
        total = collapsed_logp_grad(a(nodes_t), a(c), a(start), a(mean), a(sd), grad)
        return np.asarray(total), grad

    return bkt_collapsed_loglik, _CACHE_VERSION


def bkt_collapsed_loglik(nodes: list[np.ndarray], c: list[np.ndarray], mean, sd):
    """Collapsed skills' total log-likelihood (a PyTensor scalar).

    Parameters
    ----------
    nodes : list of float64 arrays, shape (n_nodes_k, n_par)
        Each collapsed skill's importance-sampling nodes (logits).
    c : list of float64 arrays, shape (n_nodes_k,)
        Their log-likelihood minus log proposal density.
    mean, sd : PyTensor vectors, shape (n_par,)
        Population means and scales of the logits.
    """
    start = np.concatenate([[0], np.cumsum([len(x) for x in c])]).astype(np.int64)
    nodes_t = np.ascontiguousarray(np.concatenate(nodes, axis=0).T, dtype=np.float64)
    cc = np.concatenate(c).astype(np.float64)
    return BKTCollapsedLogLik()(nodes_t, cc, start, mean, sd)[0]
