"""antipasto: the adapters every arm trains (a deployed tensor + a quarantine tensor per wrapped Linear).

    python -c "import antipasto, torch; print(antipasto.DEFAULT_TARGETS, antipasto.ADAPTER_KINDS)"
    python scripts/count_params.py          # trainable parameter counts (Qwen3-4B shape, tiny models)

Three kinds, chosen per run with wrap_model(model, ..., kind=...). For a wrapped nn.Linear W (d_out, d_in)
with SVD W = U diag(S) Vh:

    svd   (default)  y = base(x) + U_r ((Vh_r x) * (delta_S + delta_S_hack))          shared basis, (r,) each
    block            y = base(x) + U_d ((Vh_d x) * delta_S) + U_q ((Vh_q x) * delta_S_hack)
                     deployed block: singular directions [0, r); quarantine block: a DIFFERENT frozen frame,
                     the next singular directions [r, 2r) (quarantine_basis="next") or a seeded random
                     orthonormal complement of the deployed one ("random"). Their gradients differ.
    lora             y = base(x) + B ((A + A_hack) x),  B = U_r frozen (d_out, r), A, A_hack (r, d_in)

`base` is the original Linear, untouched and frozen: it IS the frozen residual, so at init (all trainable
tensors zero) the adapter branch is exactly zero and the forward is bit-identical to the original model in
every dtype. Only the deployed / quarantine tensors (float32) train; `ad.dep` / `ad.quar` name them for
every kind (delta_S / delta_S_hack for svd and block, A / A_hack for lora).

Modes are context managers over the whole model and compose (nesting keeps the most restrictive):
    ablate_quarantine(model)   quarantine treated as 0 (the deployed model)
    reference(model)           both treated as 0: exactly base(x), the KL reference without a copy
    merged_inference(model)    no-grad fast path: W + delta W folded into a weight copy
    shrinkage(model)           magnitude control: c * (full update), c = 1 - |dW_quar| / |dW_full|

Gradient surgery (`surgery`) edits the deployed grad after backward() and before optimizer.step():
    measure  report cos(g, v) only
    erase    if g.v > 0: g <- g - (g.v) v   (one-sided)
    route    deployed grad := erase(g); quarantine grad := the removed part (svd, lora: same basis),
             or, for block (different basis), the quarantine keeps its own raw gradient (docs/adapter.md)

Adam interaction (decided here, see docs/adapter.md): the EDITED gradient is what enters the
optimizer; Adam's moments are not projected separately. The first moment is a positive
combination of edited gradients, so m.v <= 0 holds, but Adam's per-coordinate preconditioner
(m / sqrt(v_hat)) can rotate the actual step toward the hack. update.apply_step (the default,
`--surgery-on step`) edits the applied step instead and logs its cosine with v (step_cos).

See docs/interfaces.md for the contract and docs/adapter.md for the design notes.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

# all attention and MLP projections of a Qwen3 / Llama decoder layer
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj")
ADAPTER_KINDS = ("svd", "lora", "block")
QUARANTINE_BASES = ("next", "random")  # block only: where the quarantine block's frozen frame comes from
SURGERY_MODES = ("measure", "erase", "route")
META_FIELDS = ("model_id", "dtype", "module_keys", "ranks")  # checked in this order; git_sha is informational
# kind fields are checked between dtype and module_keys; files written before they existed are svd/shared
KIND_DEFAULTS = {"kind": "svd", "quarantine_basis": "shared"}
# the deployed parameter's coordinates: svd and block with the same rank share them (top-r singular
# directions of W), so a direction extracted on one is valid on the other; lora's are A's entries
DEPLOYED_SPACE = {"svd": "top_r_singular", "block": "top_r_singular", "lora": "lora_A"}
UNIT_NORM_TOL = 1e-3  # directions must have |v| within this of 1
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _module_seed(seed: int, name: str) -> int:
    """A per-module seed from (seed, crc32(name)): independent of which other modules are wrapped."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def resolve_rank(kind: str, d_out: int, d_in: int, rank: int | None) -> int:
    """The rank a module gets. svd: rank or full min(d_out, d_in); block: rank per block, clipped to
    min(d_out, d_in) // 2 (default), since both blocks must fit; lora: rank required, clipped to min."""
    full = min(d_out, d_in)
    if kind == "svd":
        r = full if rank is None else min(int(rank), full)
    elif kind == "block":
        r = full // 2 if rank is None else min(int(rank), full // 2)
    elif kind == "lora":
        if rank is None:
            raise ValueError("kind='lora' needs rank=r (e.g. 16): "
                             "a full-rank A (min(d_out, d_in), d_in) is as large as W; pass rank explicitly")
        r = min(int(rank), full)
    else:
        raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    if r < 1:
        raise ValueError(f"rank must be >= 1 (or None for the default), got {rank} (kind={kind!r}, "
                         f"module {d_out}x{d_in})")
    return r


def _counts(kind: str, d_out: int, d_in: int, r: int) -> tuple[int, int, int]:
    """(deployed trainable, quarantine trainable, frozen buffer elements) of one module."""
    if kind == "svd":  # U (d_out, r), S (r,), Vh (r, d_in)
        return r, r, d_out * r + r + r * d_in
    if kind == "block":  # U (d_out, 2r), S (2r,), Vh (2r, d_in)
        return r, r, d_out * 2 * r + 2 * r + 2 * r * d_in
    if kind == "lora":  # B (d_out, r), S (r,)
        return r * d_in, r * d_in, d_out * r + r
    raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# The adapter modules
# ----------------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """Common part of every kind: one wrapped nn.Linear with a deployed and a quarantine trainable tensor.

    Subclasses set `kind`, the parameter names DEP / QUAR, and implement _branch (the added output),
    delta_weight_parts (the float32 weight delta), _per_sample (per-sample grads from a hook) and
    update_norms. `dep` / `quar` return the deployed / quarantine Parameter for any kind.
    """

    kind = ""
    DEP = "delta_S"
    QUAR = "delta_S_hack"

    def _init_common(self, base: nn.Linear, name: str) -> tuple[int, int]:
        assert isinstance(base, nn.Linear), (
            f"{type(self).__name__} wraps nn.Linear, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base.weight.shape
        self.d_in, self.d_out = d_in, d_out
        # mode flags (see ablate_quarantine / reference); plain attributes, not state
        self.use_dep = True
        self.use_hack = True
        self._merged: dict | None = None  # set by merged_inference
        self._fused: dict | None = None  # set by fused_training (svd only)
        self._capture: "PerSampleCapture | None" = None  # set by capture_per_sample
        self._name = name
        return d_out, d_in

    @property
    def dep(self) -> nn.Parameter:
        """The deployed trainable tensor (delta_S for svd/block, A for lora)."""
        return getattr(self, self.DEP)

    @property
    def quar(self) -> nn.Parameter:
        """The quarantine trainable tensor (delta_S_hack for svd/block, A_hack for lora)."""
        return getattr(self, self.QUAR)

    def quarantine_basis(self) -> str:
        """Metadata string for the quarantine's frozen frame ("shared" when it is the deployed one)."""
        return "shared"

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, d_in={self.d_in}, d_out={self.d_out}, r={self.r}, "
                f"use_dep={self.use_dep}, use_hack={self.use_hack}")

    def _check_float32(self) -> None:
        for p in (self.dep, self.quar):
            if p.dtype != torch.float32:
                raise RuntimeError(f"{self._name}: {self.DEP}/{self.QUAR} is {p.dtype}, must stay float32; "
                                   "cast the model (model.to(dtype)) BEFORE wrap_model, not after")

    def mode_delta_weight(self) -> Tensor | None:
        """float32 (d_out, d_in) weight delta of the current mode, or None when the branch is off."""
        if not (self.use_dep or self.use_hack):
            return None
        return self.delta_weight_parts(self.use_dep, self.use_hack)

    def mode_weight(self) -> Tensor:
        """W + dW of the current mode (float32 sum, W's dtype; W itself when the branch is off), detached:
        what merged_inference, fused_training and vllm_backend fold into one weight."""
        W = self.base.weight.detach()
        dW = self.mode_delta_weight()
        return W if dW is None else (W.float() + dW).to(W.dtype)  # (d_out, d_in)

    def forward(self, x: Tensor) -> Tensor:  # x (..., d_in) -> (..., d_out)
        if self._merged is not None:
            return self._merged_forward(x)
        if self._fused is not None and self._capture is None and torch.is_grad_enabled():
            y = self._fused_forward(x)
            if y is not None:
                return y
        if not (self.use_dep or self.use_hack):  # reference: exactly the original layer
            return self.base(x)
        self._check_float32()
        return self.base(x) + self._branch(x)

    def _merged_forward(self, x: Tensor) -> Tensor:
        m = self._merged
        assert m is not None
        if torch.is_grad_enabled() and (self.dep.requires_grad or self.quar.requires_grad):
            raise RuntimeError(
                f"{self._name}: forward with grad enabled inside merged_inference(): the merged weight "
                f"gives no gradient to {self.DEP}. Use torch.no_grad() for generation, "
                "or leave merged_inference()."
            )
        key = self._merged_key()
        if key != m["key"]:
            raise RuntimeError(
                f"{self._name}: mode or {self.DEP} changed inside merged_inference() (merged for {m['key']}, "
                f"now {key}); exit and re-enter merged_inference() after changing modes or "
                "stepping the optimizer."
            )
        return F.linear(x, m["weight"], self.base.bias)

    def _merged_key(self) -> tuple:
        return (self.use_dep, self.use_hack, self.dep._version, self.quar._version)

    def _fused_forward(self, x: Tensor) -> Tensor | None:
        """fused_training path (svd): F.linear with the cached merged weight, delta grad from a custom
        backward. None when it does not apply (branch off or nothing trainable in the current mode)."""
        return None


class SVDAdapter(Adapter):
    """kind="svd": y = base(x) + U @ ((Vh @ x) * (delta_S + delta_S_hack)).

    U (d_out, r), S (r,), Vh (r, d_in): frozen buffers in the model dtype, from an SVD in float32.
    delta_S, delta_S_hack: float32 Parameters (r,), zero-init; cast to the activation dtype in forward.
    Both scale the same directions, so their raw gradients are identical (docs/arms.md, route caveat).
    """

    kind = "svd"

    def __init__(self, base: nn.Linear, rank: int | None = None, name: str = ""):
        super().__init__()
        d_out, d_in = self._init_common(base, name)
        r = resolve_rank("svd", d_out, d_in, rank)
        W = base.weight.detach()  # (d_out, d_in)
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        dtype = W.dtype
        # non-persistent: recomputable from W, and large (full rank U is as big as W)
        self.register_buffer("U", U[:, :r].contiguous().to(dtype), persistent=False)  # (d_out, r)
        self.register_buffer("S", S[:r].contiguous().to(dtype), persistent=False)  # (r,)
        self.register_buffer("Vh", Vh[:r].contiguous().to(dtype), persistent=False)  # (r, d_in)
        self.delta_S = nn.Parameter(torch.zeros(r, dtype=torch.float32, device=W.device))
        self.delta_S_hack = nn.Parameter(torch.zeros(r, dtype=torch.float32, device=W.device),
                                         requires_grad=False)
        self.r = r

    def scale(self) -> Tensor | None:
        """The float32 (r,) diagonal the current mode applies, or None when the branch is off."""
        if self.use_dep and self.use_hack:
            return self.delta_S + self.delta_S_hack
        if self.use_dep:
            return self.delta_S
        if self.use_hack:
            return self.delta_S_hack
        return None

    def delta_weight(self, scale: Tensor) -> Float[Tensor, "d_out d_in"]:
        """U diag(scale) Vh in float32 (no grad)."""
        with torch.no_grad():
            return (self.U.float() * scale.float()) @ self.Vh.float()  # (d_out, d_in)

    def delta_weight_parts(self, dep: bool, quar: bool) -> Tensor:
        z = torch.zeros_like(self.delta_S)
        s = (self.delta_S.detach() if dep else z) + (self.delta_S_hack.detach() if quar else z)  # (r,)
        return self.delta_weight(s)

    def update_norms(self) -> tuple[float, float, float]:
        """Frobenius norms of (dW_dep, dW_quar, dW_full); U, Vh orthonormal so |U diag(s) Vh|_F = |s|."""
        a, b = self.delta_S.detach().double(), self.delta_S_hack.detach().double()
        return float(a.norm()), float(b.norm()), float((a + b).norm())

    def _branch(self, x: Tensor) -> Tensor:
        s = self.scale()
        h = x @ self.Vh.T  # (..., r)
        z = h * s.to(h.dtype)  # (..., r)
        if self._capture is not None and torch.is_grad_enabled() and z.requires_grad:
            self._capture._record(self, h, z)
        return z @ self.U.T  # (..., d_out)

    def _per_sample(self, h: Tensor, gz: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g = (h.float() * gz.float()).sum(dim=1)  # (B, r): sum over tokens of (Vh x) * (U^T dL/dy)
        # one shared scale: the per-sample grad of delta_S_hack is the same tensor whenever both are on
        return (g if self.use_dep else None), (g if self.use_hack else None)

    def _unmerge(self, dW: Tensor) -> tuple[Tensor, float]:
        D = self.U.float().T @ dW @ self.Vh.float().T  # (r, r)
        d = torch.diagonal(D).clone()  # (r,)
        return d, float((D - torch.diag(d)).abs().max())

    def _fused_forward(self, x: Tensor) -> Tensor | None:
        s = self.scale()
        if s is None or not s.requires_grad:
            return None
        assert self._fused is not None
        key = self._merged_key()
        if self._fused.get("key") != key:  # rebuilt once per optimizer step / mode change
            self._check_float32()
            self._fused["weight"] = self.mode_weight()  # (d_out, d_in)
            self._fused["key"] = key
        return _FusedSVDLinear.apply(x, self._fused["weight"], self.base.bias, self.U, self.Vh, s)


class _FusedSVDLinear(torch.autograd.Function):
    """y = x (W + U diag(s) Vh)^T + b in ONE matmul; backward gives dL/dx (through the merged weight) and
    dL/ds = sum over tokens of (Vh x) * (U^T dL/dy) in float32, the same gradient as the unfused branch.
    Saves x only (as the unfused branch does); Vh x is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor | None, U: Tensor, Vh: Tensor, s: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, U, Vh)
        return F.linear(x, w, bias)  # (..., d_out)

    @staticmethod
    def backward(ctx, gy: Tensor):  # gy (..., d_out)
        x, w, U, Vh = ctx.saved_tensors
        gx = gy @ w if ctx.needs_input_grad[0] else None  # (..., d_in)
        gs = None
        if ctx.needs_input_grad[5]:
            h = (x @ Vh.T).reshape(-1, Vh.shape[0])  # (N, r)
            gz = (gy @ U).reshape(-1, U.shape[1])  # (N, r)
            gs = (h.float() * gz.float()).sum(0)  # (r,)
        return gx, None, None, None, None, gs


class BlockAdapter(Adapter):
    """kind="block": y = base(x) + U_d ((Vh_d x) * delta_S) + U_q ((Vh_q x) * delta_S_hack).

    Deployed frame U_d (d_out, r), Vh_d (r, d_in): the top-r singular directions of W. Quarantine frame
    U_q, Vh_q: the next r singular directions [r, 2r) (quarantine_basis="next") or a seeded random
    orthonormal frame inside the orthogonal complement of the deployed one ("random"; per module seeded
    from (basis_seed, crc32(name))). Stored concatenated: U (d_out, 2r) = [U_d | U_q], Vh (2r, d_in),
    S (2r,) = diag(U^T W Vh^T) (the singular values for "next"; analysis only). delta_S, delta_S_hack:
    float32 (r,) each, zero-init. Because U_d ⟂ U_q and Vh_d ⟂ Vh_q the two raw gradients differ.
    """

    kind = "block"

    def __init__(self, base: nn.Linear, rank: int | None = None, name: str = "",
                 quarantine_basis: str = "next", basis_seed: int = 0):
        super().__init__()
        d_out, d_in = self._init_common(base, name)
        if quarantine_basis not in QUARANTINE_BASES:
            raise ValueError(f"quarantine_basis must be one of {QUARANTINE_BASES}, got {quarantine_basis!r}")
        r = resolve_rank("block", d_out, d_in, rank)
        W = base.weight.detach()  # (d_out, d_in)
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        U_d, Vh_d = U[:, :r], Vh[:r]  # (d_out, r), (r, d_in)
        if quarantine_basis == "next":
            U_q, Vh_q = U[:, r : 2 * r], Vh[r : 2 * r]  # (d_out, r), (r, d_in)
        else:
            gen = torch.Generator().manual_seed(_module_seed(basis_seed, name))
            U_q = random_complement(U_d, r, gen)  # (d_out, r)
            Vh_q = random_complement(Vh_d.T, r, gen).T  # (r, d_in)
        Uc = torch.cat([U_d, U_q.to(U_d.dtype)], dim=1)  # (d_out, 2r)
        Vhc = torch.cat([Vh_d, Vh_q.to(Vh_d.dtype)], dim=0)  # (2r, d_in)
        Sc = torch.diagonal(Uc.T @ W.float() @ Vhc.T)  # (2r,)
        dtype = W.dtype
        self.register_buffer("U", Uc.contiguous().to(dtype), persistent=False)  # (d_out, 2r)
        self.register_buffer("S", Sc.contiguous().to(dtype), persistent=False)  # (2r,)
        self.register_buffer("Vh", Vhc.contiguous().to(dtype), persistent=False)  # (2r, d_in)
        self.delta_S = nn.Parameter(torch.zeros(r, dtype=torch.float32, device=W.device))
        self.delta_S_hack = nn.Parameter(torch.zeros(r, dtype=torch.float32, device=W.device),
                                         requires_grad=False)
        self.r = r
        self.basis = quarantine_basis if quarantine_basis == "next" else f"random:{int(basis_seed)}"

    def quarantine_basis(self) -> str:
        return self.basis

    def scale(self) -> Tensor:
        """float32 (2r,) = [delta_S or 0 | delta_S_hack or 0] for the current mode (branch on)."""
        z = torch.zeros_like(self.delta_S)
        return torch.cat([self.delta_S if self.use_dep else z, self.delta_S_hack if self.use_hack else z])

    def delta_weight_parts(self, dep: bool, quar: bool) -> Tensor:
        with torch.no_grad():
            z = torch.zeros_like(self.delta_S)
            s = torch.cat([self.delta_S if dep else z, self.delta_S_hack if quar else z]).float()  # (2r,)
            return (self.U.float() * s) @ self.Vh.float()  # (d_out, d_in)

    def update_norms(self) -> tuple[float, float, float]:
        """Frobenius norms of (dW_dep, dW_quar, dW_full); the blocks are orthogonal,
        so they add in squares."""
        a, b = float(self.delta_S.detach().double().norm()), float(self.delta_S_hack.detach().double().norm())
        return a, b, math.sqrt(a * a + b * b)

    def _branch(self, x: Tensor) -> Tensor:
        s = self.scale()  # (2r,)
        h = x @ self.Vh.T  # (..., 2r)
        z = h * s.to(h.dtype)  # (..., 2r)
        if self._capture is not None and torch.is_grad_enabled() and z.requires_grad:
            self._capture._record(self, h, z)
        return z @ self.U.T  # (..., d_out)

    def _per_sample(self, h: Tensor, gz: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g = (h.float() * gz.float()).sum(dim=1)  # (B, 2r)
        r = self.r
        return (g[:, :r] if self.use_dep else None), (g[:, r:] if self.use_hack else None)

    def _unmerge(self, dW: Tensor) -> tuple[Tensor, float]:
        D = self.U[:, : self.r].float().T @ dW @ self.Vh[: self.r].float().T  # (r, r)
        d = torch.diagonal(D).clone()  # (r,)
        return d, float((D - torch.diag(d)).abs().max())


class LoRAAdapter(Adapter):
    """kind="lora": y = base(x) + B ((A + A_hack) x), B = U_r (the top-r left singular vectors), frozen.

    B (d_out, r) and S (r,) are frozen buffers in the model dtype; A, A_hack: float32 (r, d_in), zero-init,
    so the model is exact at init. With B orthonormal, |B A|_F = |A|_F and A = diag(delta_S) Vh_r gives
    the svd adapter back: lora strictly contains svd at the same rank (more expressive, same basis).
    B is shared, so the raw grads of A and A_hack are identical (like svd): see docs/adapter.md.
    """

    kind = "lora"
    DEP = "A"
    QUAR = "A_hack"

    def __init__(self, base: nn.Linear, rank: int | None = None, name: str = ""):
        super().__init__()
        d_out, d_in = self._init_common(base, name)
        r = resolve_rank("lora", d_out, d_in, rank)
        W = base.weight.detach()  # (d_out, d_in)
        U, S, _ = torch.linalg.svd(W.float(), full_matrices=False)  # (d_out, k), (k,)
        dtype = W.dtype
        self.register_buffer("B", U[:, :r].contiguous().to(dtype), persistent=False)  # (d_out, r)
        self.register_buffer("S", S[:r].contiguous().to(dtype), persistent=False)  # (r,)
        self.A = nn.Parameter(torch.zeros(r, d_in, dtype=torch.float32, device=W.device))
        self.A_hack = nn.Parameter(torch.zeros(r, d_in, dtype=torch.float32, device=W.device),
                                   requires_grad=False)
        self.r = r

    def effective_A(self) -> Tensor:
        """float32 (r, d_in) for the current mode (branch on)."""
        if self.use_dep and self.use_hack:
            return self.A + self.A_hack
        return self.A if self.use_dep else self.A_hack

    def delta_weight_parts(self, dep: bool, quar: bool) -> Tensor:
        with torch.no_grad():
            z = torch.zeros_like(self.A)
            A = (self.A if dep else z) + (self.A_hack if quar else z)  # (r, d_in)
            return self.B.float() @ A.float()  # (d_out, d_in)

    def update_norms(self) -> tuple[float, float, float]:
        """Frobenius norms of (dW_dep, dW_quar, dW_full); B orthonormal so |B A|_F = |A|_F."""
        a, b = self.A.detach().double(), self.A_hack.detach().double()
        return float(a.norm()), float(b.norm()), float((a + b).norm())

    def _branch(self, x: Tensor) -> Tensor:
        A = self.effective_A()
        z = x @ A.to(x.dtype).T  # (..., r)
        if self._capture is not None and torch.is_grad_enabled() and z.requires_grad:
            self._capture._record(self, x, z)
        return z @ self.B.T  # (..., d_out)

    def _per_sample(self, x: Tensor, gz: Tensor) -> tuple[Tensor | None, Tensor | None]:
        g = torch.einsum("btr,bti->bri", gz.float(), x.float())  # (B, r, d_in): sum_t (B^T dL/dy_t) x_t^T
        return (g if self.use_dep else None), (g if self.use_hack else None)

    def _unmerge(self, dW: Tensor) -> tuple[Tensor, float]:
        A = self.B.float().T @ dW  # (r, d_in)
        return A, float((dW - self.B.float() @ A).abs().max())


def random_complement(Q: Tensor, r: int, gen: torch.Generator) -> Tensor:
    """A random (d, r) orthonormal frame orthogonal to the columns of Q (d, k) (orthonormal), float32.

    Gaussian (d, r), minus its projection on Q (twice, for float precision), then QR. Needs k + r <= d.
    """
    d, k = Q.shape
    assert k + r <= d, f"random_complement: need k + r <= d, got k={k}, r={r}, d={d}"
    Q64 = Q.double()
    G = torch.randn(d, r, generator=gen, dtype=torch.float64)  # (d, r)
    for _ in range(2):
        G = G - Q64 @ (Q64.T @ G)
    Qc, R = torch.linalg.qr(G)  # (d, r), (r, r)
    Qc = Qc * torch.sign(torch.diagonal(R))  # unique sign: positive diagonal of R
    return Qc.float()


# ----------------------------------------------------------------------------------------------
# Wrapping and trainability
# ----------------------------------------------------------------------------------------------
def _layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _matches(name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """A target matches the leaf name exactly / by glob ("*_proj"), or the full name by glob ("*.mlp.*")."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(leaf, t) or fnmatch.fnmatchcase(name, t) for t in targets)


def select_linears(model: nn.Module, targets=DEFAULT_TARGETS, layers=None) -> dict[str, nn.Linear]:
    """The nn.Linear modules wrap_model would wrap (name -> module), in model order. No side effects."""
    if isinstance(targets, str):
        targets = (targets,)
    layer_set = None if layers is None else set(int(i) for i in layers)
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not _matches(name, targets):
            continue
        if layer_set is not None and _layer_index(name) not in layer_set:
            continue
        out[name] = mod
    return out


def _check_kind_args(kind: str, quarantine_basis: str) -> None:
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {ADAPTER_KINDS}, got {kind!r}")
    if quarantine_basis not in QUARANTINE_BASES:
        raise ValueError(f"quarantine_basis must be one of {QUARANTINE_BASES}, got {quarantine_basis!r}")
    if kind != "block" and quarantine_basis != "next":
        raise ValueError(f"quarantine_basis={quarantine_basis!r} applies to kind='block' only (kind={kind!r} "
                         "shares one frame between the deployed and quarantine tensors); leave it at 'next'")


def wrap_model(
    model: nn.Module, targets=DEFAULT_TARGETS, layers=None, rank: int | None = None, quarantine: bool = False,
    kind: str = "svd", quarantine_basis: str = "next", basis_seed: int = 0,
) -> dict[str, Adapter]:
    """Replace chosen nn.Linear modules with adapters of `kind` in place; freeze everything else.

    targets: leaf names or glob patterns (leaf or full name). layers: iterable of layer indices or None (all).
    kind: "svd" (shared-basis delta_S pair, default), "block" (deployed and quarantine in different frozen
      frames), "lora" (frozen B = U_r, trainable A / A_hack). See resolve_rank for `rank` per kind:
      svd None = full rank; block None = min(d_out, d_in) // 2 per block; lora needs rank.
    quarantine_basis / basis_seed: block only: "next" = singular directions [r, 2r), "random" = seeded
      random orthonormal complement of the deployed frame.
    quarantine: whether the quarantine tensor trains (route / gated arms); see set_trainable.
    Returns name -> adapter.
    """
    _check_kind_args(kind, quarantine_basis)
    if get_adapters(model):
        raise ValueError("model already has SVDAdapter (or Block/LoRA) adapter modules; "
                         "wrap_model must be called once on a fresh model")
    chosen = select_linears(model, targets, layers)
    if not chosen:
        raise ValueError(
            f"wrap_model: no nn.Linear matched targets={tuple(targets)} layers={layers}; "
            "check the module names with [n for n, m in model.named_modules()]"
        )
    for name, lin in chosen.items():  # resolve every rank before replacing anything
        resolve_rank(kind, lin.weight.shape[0], lin.weight.shape[1], rank)
    for name, lin in chosen.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if kind == "svd":
            ad = SVDAdapter(lin, rank=rank, name=name)
        elif kind == "block":
            ad = BlockAdapter(lin, rank=rank, name=name, quarantine_basis=quarantine_basis,
                              basis_seed=basis_seed)
        else:
            ad = LoRAAdapter(lin, rank=rank, name=name)
        setattr(parent, leaf, ad)
    set_trainable(model, quarantine=quarantine)
    return get_adapters(model)


def get_adapters(model: nn.Module) -> dict[str, Adapter]:
    """name -> adapter (any kind), in model order (the names are the original Linear names)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Adapter)}


def adapter_kind(model_or_adapters) -> str:
    """The kind of a wrapped model (or of an adapters dict); all adapters of one model share it."""
    ads = get_adapters(model_or_adapters) if isinstance(model_or_adapters, nn.Module) else model_or_adapters
    assert ads, "adapter_kind: no adapters; call wrap_model first"
    kinds = {a.kind for a in ads.values()}
    assert len(kinds) == 1, f"adapters of mixed kinds {sorted(kinds)}"
    return kinds.pop()


def set_trainable(model: nn.Module, quarantine: bool) -> list[nn.Parameter]:
    """Freeze all parameters except the deployed tensor (and the quarantine iff quarantine).
    Returns the trainable ones.

    Non-route arms use quarantine=False so an optimizer built from requires_grad params never moves
    the quarantine (for svd/lora its raw grad equals the deployed one and would silently double the update).
    """
    ads = get_adapters(model)
    assert ads, "set_trainable: model has no adapter; call wrap_model first"
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for ad in ads.values():
        ad.dep.requires_grad_(True)
        ad.quar.requires_grad_(bool(quarantine))
        out.append(ad.dep)
        if quarantine:
            out.append(ad.quar)
    return out


def count_adapter_params(model: nn.Module, targets=DEFAULT_TARGETS, layers=None, rank=None,
                         kind: str = "svd") -> dict:
    """Parameter counts from Linear shapes only (works on a meta-device model; nothing is wrapped).

    Returns {n_modules, delta_S (deployed trainable elements: delta_S for svd/block, A for lora),
    trainable_route (deployed + quarantine), frozen_buffers (U, S, Vh / B, S elements),
    base_linear (elements of the wrapped W)}. On a wrapped model its adapters are counted
    (targets/layers/rank/kind ignored).
    """
    ads = get_adapters(model)
    if ads:
        shapes = [(a.kind, a.d_out, a.d_in, a.r) for a in ads.values()]
    else:  # the Linears wrap_model would pick
        shapes = []
        for lin in select_linears(model, targets, layers).values():
            d_out, d_in = lin.weight.shape
            shapes.append((kind, d_out, d_in, resolve_rank(kind, d_out, d_in, rank)))
    n = dep = quar = buf = base = 0
    for k, d_out, d_in, r in shapes:
        a, b, f = _counts(k, d_out, d_in, r)
        n += 1
        dep += a
        quar += b
        buf += f
        base += d_out * d_in
    return {"n_modules": n, "delta_S": dep, "trainable_route": dep + quar, "frozen_buffers": buf,
            "base_linear": base}


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
@contextmanager
def _set_flags(model: nn.Module, **flags) -> Iterator[dict[str, Adapter]]:
    ads = get_adapters(model)
    assert ads, "mode context: model has no adapter; call wrap_model first"
    prev = {n: (a.use_dep, a.use_hack) for n, a in ads.items()}
    try:
        for a in ads.values():
            for k, v in flags.items():
                setattr(a, k, v)
        yield ads
    finally:
        for n, a in ads.items():
            a.use_dep, a.use_hack = prev[n]


@contextmanager
def ablate_quarantine(model: nn.Module):
    """Deploy mode: the quarantine tensor treated as 0. Nested inside reference() it stays reference."""
    with _set_flags(model, use_hack=False) as ads:
        yield ads


@contextmanager
def reference(model: nn.Module):
    """Both tensors treated as 0: each adapter returns base(x), i.e. exactly the original model."""
    with _set_flags(model, use_dep=False, use_hack=False) as ads:
        yield ads


@contextmanager
def merged_inference(model: nn.Module):
    """No-grad fast path: fold the current mode's weight delta into a copy of W per adapter.

    Inside, each adapter costs one F.linear, like the base model. Costs one extra weight copy per
    adapter while active. Changing mode or stepping a trainable tensor inside raises; grad-enabled
    forwards raise. Outputs match the unmerged forward to float tolerance (not bit-exactly).
    """
    ads = get_adapters(model)
    assert ads, "merged_inference: model has no adapter; call wrap_model first"
    prev = {n: a._merged for n, a in ads.items()}
    try:
        for a in ads.values():
            a._merged = {"weight": a.mode_weight(), "key": a._merged_key()}  # (d_out, d_in)
        yield ads
    finally:
        for n, a in ads.items():
            a._merged = prev[n]


@contextmanager
def fused_training(model: nn.Module):
    """Faster train pass for svd adapters: inside, a grad-enabled forward of an adapter whose trainable
    tensor is on costs ONE matmul with a cached merged weight W + U diag(s) Vh (rebuilt when the mode or
    the tensors change, e.g. once per optimizer step), and the delta gradient comes from a custom backward
    (_FusedSVDLinear), instead of three matmuls in forward. Same gradient as the unfused path up to float
    rounding of the merged weight (tests/test_antipasto_fused.py). No-grad forwards, reference mode and
    per-sample capture (gate arms) take the ordinary path. Other kinds: no effect. Costs one weight copy
    per adapter while active."""
    ads = get_adapters(model)
    assert ads, "fused_training: model has no adapter; call wrap_model first"
    prev = {n: a._fused for n, a in ads.items()}
    try:
        for a in ads.values():
            if a.kind == "svd":
                a._fused = {}
        yield ads
    finally:
        for n, a in ads.items():
            a._fused = prev[n]


@contextmanager
def shrinkage(model: nn.Module):
    """Magnitude control (any kind): deploy c * (full update) per module, quarantine folded in, with
    c = 1 - |dW_quar|_F / |dW_full|_F, so the update mass it removes equals what ablating the quarantine
    removes (c clamped at 0 when |dW_quar| >= |dW_full|, possible in svd/lora when the two partly cancel).
    Implemented by scaling both trainable tensors by c in place (restored on exit, also on error). For svd
    this is c * (delta_S + delta_S_hack); for block it keeps both blocks (the full update lives in both
    frames). Use with torch.no_grad() (evaluation only)."""
    ads = get_adapters(model)
    assert ads, "shrinkage: model has no adapter; call wrap_model first"
    saved = []
    try:
        with torch.no_grad():
            for a in ads.values():
                _, nq, nf = a.update_norms()
                c = max(0.0, 1.0 - nq / nf) if nf > 0 else 1.0  # |dW_q| >= |dW_full|: nothing left to deploy
                saved.append((a, a.dep.detach().clone(), a.quar.detach().clone()))
                a.dep.mul_(c)
                a.quar.mul_(c)
        with _set_flags(model, use_dep=True, use_hack=True):
            yield ads
    finally:
        with torch.no_grad():
            for a, d, q in saved:
                a.dep.copy_(d)
                a.quar.copy_(q)


# ----------------------------------------------------------------------------------------------
# Gradient surgery
# ----------------------------------------------------------------------------------------------
@jaxtyped(typechecker=beartype)
def project_one(
    g: Float[Tensor, " r"], v: Float[Tensor, " r"], mode: str
) -> tuple[Float[Tensor, " r"], Float[Tensor, " r"], dict]:
    """One module's split in float64. Returns (g_deployed, g_removed, stats); g_dep + g_rem == g (fp64).

    measure: g_dep = g, g_rem = 0. erase/route: if g.v > 0, g_rem = (g.v) v, g_dep = g - g_rem.
    v is renormalised in float64 (callers check |v| ~ 1 first).
    """
    assert mode in SURGERY_MODES, f"mode must be one of {SURGERY_MODES}, got {mode!r}"
    g64, v64 = g.double(), v.double()
    v64 = v64 / v64.norm()
    dot = torch.dot(g64, v64)
    gn = g64.norm()
    cos_in = float(dot / gn) if gn > 0 else 0.0
    positive = bool(dot > 0)
    fired = positive and mode != "measure"
    g_rem = dot * v64 if fired else torch.zeros_like(g64)  # (r,)
    g_dep = g64 - g_rem  # (r,)
    dn = g_dep.norm()
    cos_out = float(torch.dot(g_dep, v64) / dn) if dn > 0 else 0.0
    stats = {"cos_in": cos_in, "cos_out": cos_out, "fired": fired, "positive": positive,
             "dot": float(dot), "g_norm": float(gn), "removed_norm": float(g_rem.norm())}
    return g_dep, g_rem, stats


def surgery(adapters: dict[str, Adapter], directions: dict[str, Tensor] | None, mode: str) -> dict:
    """Edit the deployed grad (and the quarantine grad in route) in place; call after backward(),
    before step().

    directions: name -> unit vector per adapter with the deployed tensor's shape ((r,) for svd/block,
    (r, d_in) for lora, compared flattened; any source: v_hack, random placebo), or None
    (measure only: reports grad norms, cos values NaN). A missing grad counts as a zero gradient.

    Returns floats:
      cos_in / cos_out      mean over modules of cos(g, v) before / after (0 for a zero gradient)
      cos_in_global / cos_out_global   cos of the concatenated gradient with the concatenated v
      frac_fired            fraction of modules where the edit was applied (0 in measure)
      frac_positive         fraction of modules with g.v > 0 (what erase would edit; all modes)
      removed_norm_frac     ||concat removed|| / ||concat g_in|| (0 in measure)
      proj_norm_frac        ||concat positive projections|| / ||concat g_in|| (what erase would remove;
                            all modes)
      grad_norm_in / grad_norm_out     norms of the concatenated deployed gradient
    plus per-module lists under "per_module": {keys, cos_in, cos_out, fired, removed_norm}.

    Adam: the edited gradient is what the optimizer sees; its moments are not projected separately
    (see module docstring / docs/adapter.md). Route, svd and lora (shared frame): the quarantine grad is
    overwritten by the removed component (its raw grad equals g because the forward uses the sum, and is
    discarded), so g_dep + g_quar == g_in. Route, block (different frames: the removed component has no
    coordinate-wise image in the quarantine's frame): the deployed grad is erase(g) as above and the
    quarantine keeps its own raw gradient; g_dep + removed == g_in still holds for the deployed part.
    Route requires set_trainable(model, quarantine=True).
    """
    if mode not in SURGERY_MODES:
        raise ValueError(f"surgery mode must be one of {SURGERY_MODES}, got {mode!r}")
    assert adapters, "surgery: no adapters given"
    keys = list(adapters)
    grads = {}
    for k in keys:
        ad = adapters[k]
        g = ad.dep.grad
        grads[k] = (torch.zeros_like(ad.dep) if g is None else g.detach().float()).reshape(-1)  # (n,)
    if directions is None:
        if mode != "measure":
            raise ValueError(f"surgery mode {mode!r} needs directions; "
                             "pass directions=None only with mode='measure'")
        gn = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
        nan = float("nan")
        return {"cos_in": nan, "cos_out": nan, "cos_in_global": nan, "cos_out_global": nan, "frac_fired": 0.0,
                "frac_positive": nan, "removed_norm_frac": 0.0, "proj_norm_frac": nan,
                "grad_norm_in": gn, "grad_norm_out": gn, "per_module": {"keys": keys}}
    missing = [k for k in keys if k not in directions]
    if missing:
        raise ValueError(f"directions lacks {len(missing)} adapter keys (first: {missing[0]!r}); "
                         "load directions made for this module set (load_directions checks module_keys)")
    if mode == "route":
        frozen = [k for k in keys if not adapters[k].quar.requires_grad]
        if frozen:
            raise ValueError(f"route needs a trainable quarantine tensor ({frozen[0]!r} is frozen); "
                             "call set_trainable(model, quarantine=True) before building the optimizer")

    vs = {}
    for k in keys:  # validate every direction before editing any grad
        g = grads[k]
        v = directions[k].detach().to(device=g.device, dtype=torch.float32)
        want = tuple(adapters[k].dep.shape)
        if tuple(v.shape) != want:
            raise ValueError(f"directions[{k!r}] has shape {tuple(v.shape)}, the deployed tensor "
                             f"{adapters[k].DEP} has shape {want}; "
                             "use directions made for this adapter kind/rank")
        v = v.reshape(-1)  # (n,)
        vn = float(v.double().norm())
        if not abs(vn - 1.0) <= UNIT_NORM_TOL:
            raise ValueError(f"directions[{k!r}] has norm {vn:.6g}, need unit norm; "
                             "normalise with v / v.norm()")
        vs[k] = v

    per = {"keys": keys, "cos_in": [], "cos_out": [], "fired": [], "removed_norm": []}
    sq_in = sq_out = sq_rem = sq_proj = 0.0
    dot_in = dot_out = vv = 0.0
    n_pos = 0
    for k in keys:
        ad, g, v = adapters[k], grads[k], vs[k]
        g_dep, g_rem, st = project_one(g, v, mode)
        per["cos_in"].append(st["cos_in"])
        per["cos_out"].append(st["cos_out"])
        per["fired"].append(st["fired"])
        per["removed_norm"].append(st["removed_norm"])
        n_pos += st["positive"]
        v64 = v.double() / v.double().norm()
        sq_in += st["g_norm"] ** 2
        sq_out += float(g_dep.pow(2).sum())
        sq_rem += st["removed_norm"] ** 2
        sq_proj += max(st["dot"], 0.0) ** 2
        dot_in += st["dot"]
        dot_out += float(torch.dot(g_dep, v64))
        vv += 1.0
        if mode != "measure":
            if ad.dep.grad is None:
                ad.dep.grad = torch.zeros_like(ad.dep)
            ad.dep.grad.copy_(g_dep.reshape(ad.dep.shape).to(ad.dep.grad.dtype))
        if mode == "route" and ad.kind != "block":  # shared frame: the removed part goes to the quarantine
            ad.quar.grad = g_rem.reshape(ad.quar.shape).to(device=ad.quar.device, dtype=ad.quar.dtype).clone()
    M = len(keys)
    g_in_norm, g_out_norm = math.sqrt(sq_in), math.sqrt(sq_out)
    return {
        "cos_in": sum(per["cos_in"]) / M,
        "cos_out": sum(per["cos_out"]) / M,
        "cos_in_global": dot_in / (g_in_norm * math.sqrt(vv)) if g_in_norm > 0 else 0.0,
        "cos_out_global": dot_out / (g_out_norm * math.sqrt(vv)) if g_out_norm > 0 else 0.0,
        "frac_fired": sum(per["fired"]) / M,
        "frac_positive": n_pos / M,
        "removed_norm_frac": math.sqrt(sq_rem) / g_in_norm if g_in_norm > 0 else 0.0,
        "proj_norm_frac": math.sqrt(sq_proj) / g_in_norm if g_in_norm > 0 else 0.0,
        "grad_norm_in": g_in_norm,
        "grad_norm_out": g_out_norm,
        "per_module": per,
    }


def random_directions(adapters: dict[str, Adapter], seed: int) -> dict[str, Tensor]:
    """Haar-random unit vectors per module in the deployed tensor's space (float32, its shape, on its device):
    normalised standard normals over the flattened tensor ((r,) for svd/block, (r, d_in) for lora).

    Each module's generator is seeded from (seed, crc32(name)), so a module's direction does not
    depend on which other modules are wrapped.
    """
    out = {}
    for k, ad in adapters.items():
        gen = torch.Generator().manual_seed(_module_seed(seed, k))
        v = torch.randn(ad.dep.numel(), generator=gen, dtype=torch.float64)  # (n,)
        out[k] = (v / v.norm()).float().reshape(ad.dep.shape).to(ad.dep.device)
    return out


# ----------------------------------------------------------------------------------------------
# Per-sample gradients in the same backward pass
# ----------------------------------------------------------------------------------------------
class PerSampleCapture:
    """Collects per-sample gradients of the deployed and quarantine tensors via hooks.

    Use through capture_per_sample(model). grads[name]: (B, *dep.shape) float32, d loss_b / d dep;
    grads_hack[name]: (B, *quar.shape), d loss_b / d quar, filled only for modules whose quarantine is on
    in the forward (train mode). For svd and lora the two are the same tensor (shared frame); for block
    they differ. Summed over samples each equals the corresponding .grad.

    svd / block: forward stores h = Vh x (B, T, r or 2r) (a reference: autograd keeps it anyway for the
    grad of the scale); a hook on z = h * scale receives dL/dz = U^T dL/dy; per-sample = sum_t h * dL/dz.
    lora: forward stores x (B, T, d_in) (autograd keeps it for the grad of A); the hook on z = A x receives
    dL/dz = B^T dL/dy; per-sample = sum_t dL/dz_t x_t^T, a (B, r, d_in) float32 tensor per module: B * r *
    d_in * 4 bytes (Qwen3-4B, r = 16, B = 64: ~10-40 MB per module, ~4 GB over 252 modules).
    Tokens that the loss masks out have dL/dy = 0, so they contribute nothing.
    One forward per module per capture; a second forward (e.g. activation checkpointing) raises.
    """

    def __init__(self):
        self.grads: dict[str, Tensor] = {}
        self.grads_hack: dict[str, Tensor] = {}
        self._seen: set[str] = set()

    def _record(self, ad: Adapter, saved: Tensor, z: Tensor) -> None:
        name = ad._name
        if saved.dim() != 3:
            raise ValueError(f"capture_per_sample: {name} got input of shape "
                             f"{tuple(saved.shape[:-1])}+(d_in,), need (B, T, d_in)")
        if name in self._seen:
            raise RuntimeError(f"capture_per_sample: {name} ran forward twice in one capture (activation "
                               "checkpointing or two forwards); use one forward + backward per capture")
        self._seen.add(name)

        def hook(gz: Tensor, saved=saved, ad=ad, name=name) -> None:
            g_dep, g_quar = ad._per_sample(saved, gz)
            for store, g in ((self.grads, g_dep), (self.grads_hack, g_quar)):
                if g is not None:
                    store[name] = store[name] + g if name in store else g

        z.register_hook(hook)


def check_per_sample_sum(name: str, per_sample: Tensor, grad: Tensor | None, dtype: torch.dtype,
                         atol: float = 1e-7) -> None:
    """Fail fast unless the per-sample gradients (N, *shape) sum to autograd's .grad (None counts as zero), to
    rtol and atol `atol` + rtol * max|grad|, rtol = max(1e-3, 2 eps(dtype)). dtype is the adapter's compute
    dtype: in a bf16 model .grad comes out of a bf16 product and is rounded (~0.5% of max|grad| measured),
    while the per-sample gradients are float32 sums, so the check is as tight as the dtype allows."""
    tot = grad if grad is not None else torch.zeros_like(per_sample[0])
    s = per_sample.sum(0)  # (*shape,)
    rtol = max(1e-3, 2 * torch.finfo(dtype).eps)
    assert torch.allclose(s, tot.float(), rtol=rtol, atol=atol + rtol * float(tot.abs().max())), (
        f"{name}: per-sample grads do not sum to the autograd grad (max err "
        f"{float((s - tot).abs().max()):.3g}, rtol {rtol:.3g} for {dtype})")


@contextmanager
def capture_per_sample(model: nn.Module):
    """with capture_per_sample(model) as cap: loss.backward()  ->  cap.grads[name]: (B, *dep.shape) float32
    (and cap.grads_hack[name] for the quarantine when it is on in the forward)."""
    ads = get_adapters(model)
    assert ads, "capture_per_sample: model has no adapter; call wrap_model first"
    cap = PerSampleCapture()
    prev = {n: a._capture for n, a in ads.items()}
    try:
        for a in ads.values():
            a._capture = cap
        yield cap
    finally:
        for n, a in ads.items():
            a._capture = prev[n]


def apply_sample_weights(adapters: dict[str, Adapter], cap: PerSampleCapture, w_dep: Tensor,
                         w_quar: Tensor | None) -> dict:
    """Per-rollout routing from captured per-sample grads: dep.grad := sum_b w_dep[b] grads[b] and,
    if w_quar is given, quar.grad := sum_b w_quar[b] grads_hack[b]. w_* are (B,) (e.g. 0/1 zone masks:
    keep -> (1, 0), mid -> (1, 1), route -> (0, 1)). Overwrites whatever backward() left in .grad.
    With w_quar None the quarantine grad is left alone. Returns {grad_norm_dep, grad_norm_quar}.
    """
    keys = list(adapters)
    missing = [k for k in keys if k not in cap.grads]
    if missing:
        raise ValueError(f"apply_sample_weights: no per-sample grads for {len(missing)} modules "
                         f"(first {missing[0]!r}); run forward + backward inside capture_per_sample with "
                         "the deployed tensor on")
    B = next(iter(cap.grads.values())).shape[0]
    for nm, w in (("w_dep", w_dep), ("w_quar", w_quar)):
        if w is not None and tuple(w.shape) != (B,):
            raise ValueError(f"apply_sample_weights: {nm} has shape {tuple(w.shape)}, need ({B},) "
                             "(one weight per sample)")
    if w_quar is not None:
        lack = [k for k in keys if k not in cap.grads_hack]
        if lack:
            raise ValueError(f"apply_sample_weights: no quarantine per-sample grads for {lack[0]!r}; "
                             "the forward must run with the quarantine on (train mode, "
                             "not ablate_quarantine)")
        frozen = [k for k in keys if not adapters[k].quar.requires_grad]
        if frozen:
            raise ValueError(f"apply_sample_weights: quarantine of {frozen[0]!r} is frozen; call "
                             "set_trainable(model, quarantine=True) before building the optimizer")
    sq_d = sq_q = 0.0
    for k in keys:
        a = adapters[k]
        g = torch.einsum("b,b...->...", w_dep.to(cap.grads[k]), cap.grads[k])  # dep.shape
        a.dep.grad = g.to(a.dep.dtype).clone()
        sq_d += float(g.double().pow(2).sum())
        if w_quar is not None:
            gq = torch.einsum("b,b...->...", w_quar.to(cap.grads_hack[k]), cap.grads_hack[k])  # quar.shape
            a.quar.grad = gq.to(a.quar.dtype).clone()
            sq_q += float(gq.double().pow(2).sum())
    return {"grad_norm_dep": math.sqrt(sq_d), "grad_norm_quar": math.sqrt(sq_q)}


# ----------------------------------------------------------------------------------------------
# State: metadata, save/load, merge
# ----------------------------------------------------------------------------------------------
def git_sha() -> str:
    """HEAD of the repository this file lives in, or "unknown" (no git, no commits)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        return sha if out.returncode == 0 and sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty(root: Path | None = None) -> tuple[list[str], str]:
    """(tracked files that differ from HEAD, `git diff HEAD` text) of this repository (or `root`); ([], "")
    when clean or without git. Untracked files are not listed (out/ and scratch files would drown the
    signal)."""
    root = root or Path(__file__).resolve().parent
    try:
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                            capture_output=True, text=True, timeout=10)
        files = [ln[3:] for ln in st.stdout.splitlines() if ln.strip()] if st.returncode == 0 else []
        if not files:
            return [], ""
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        return files, diff.stdout if diff.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return [], ""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def adapter_meta(model: nn.Module, model_id: str) -> dict:
    """{model_id, dtype, adapter_kind, quarantine_basis, module_keys, ranks,
    git_sha} for this wrapped model."""
    ads = get_adapters(model)
    assert ads, "adapter_meta: model has no adapter; call wrap_model first"
    first = next(iter(ads.values()))
    bases = {a.quarantine_basis() for a in ads.values()}
    assert len(bases) == 1, f"adapters with mixed quarantine bases {sorted(bases)}"
    return {"model_id": str(model_id), "dtype": _dtype_name(first.base.weight.dtype),
            "adapter_kind": adapter_kind(ads), "quarantine_basis": bases.pop(),
            "module_keys": list(ads), "ranks": [a.r for a in ads.values()], "git_sha": git_sha()}


def check_meta(meta: dict, model: nn.Module, model_id: str, directions: bool = False) -> None:
    """Raise ValueError naming the first mismatching field among model_id, dtype, adapter_kind,
    quarantine_basis, module_keys, ranks. Files without the kind fields (written before they existed)
    count as adapter_kind "svd", quarantine_basis "shared".

    directions=True (load_directions): a direction lives in the deployed tensor's coordinates, so the kind
    is compared by DEPLOYED_SPACE (svd and block with the same ranks share the top-r singular frame) and
    quarantine_basis is not compared.
    """
    want = adapter_meta(model, model_id)
    meta = {**{"adapter_kind": KIND_DEFAULTS["kind"], "quarantine_basis": KIND_DEFAULTS["quarantine_basis"]},
            **meta}
    fields = (("model_id", "dtype", "adapter_kind") + (() if directions else ("quarantine_basis",))
              + META_FIELDS[2:])
    for field in fields:
        if field not in meta:
            raise ValueError(f"metadata lacks field {field!r} (has {sorted(meta)}); "
                             "the file was not written by save_adapter/save_directions")
        got, exp = meta[field], want[field]
        if field in ("module_keys", "ranks"):
            got = list(got)
        if field == "adapter_kind" and directions:
            if got not in DEPLOYED_SPACE:
                raise ValueError(f"adapter metadata mismatch in field 'adapter_kind': file has {got!r}, "
                                 f"not one of {ADAPTER_KINDS}")
            if DEPLOYED_SPACE[got] == DEPLOYED_SPACE[exp]:
                continue
        if got != exp:
            if field == "module_keys":
                extra = sorted(set(got) - set(exp))[:3]
                lack = sorted(set(exp) - set(got))[:3]
                detail = (f"file has {len(got)} keys, model {len(exp)}; "
                          f"only in file: {extra}, only in model: {lack}")
            elif field == "ranks":
                diff = [(k, a, b) for k, a, b in zip(want["module_keys"], got, exp) if a != b][:3]
                detail = (f"file ranks vs model ranks differ, e.g. (key, file, model) {diff}" if diff
                          else f"lengths {len(got)} vs {len(exp)}")
            else:
                detail = f"file has {got!r}, model has {exp!r}"
            raise ValueError(f"adapter metadata mismatch in field {field!r}: {detail}. "
                             "Load into a model built with the same model, dtype, adapter kind "
                             "(and quarantine_basis), targets/layers and rank.")


def _encode_meta(meta: dict) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in meta.items()}


def _read_file(path) -> tuple[dict, dict[str, Tensor]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: json.loads(v) for k, v in raw.items()}, tensors


def save_adapter(path, model: nn.Module, model_id: str, extra: dict | None = None) -> None:
    """The deployed and quarantine tensors of every adapter as float32 safetensors ("<name>.delta_S",
    "<name>.delta_S_hack" for svd/block, "<name>.A", "<name>.A_hack" for lora); metadata as JSON strings."""
    ads = get_adapters(model)
    meta = adapter_meta(model, model_id)
    if extra is not None:
        meta["extra"] = extra
    tensors = {}
    for k, a in ads.items():
        tensors[f"{k}.{a.DEP}"] = a.dep.detach().float().cpu().contiguous()
        tensors[f"{k}.{a.QUAR}"] = a.quar.detach().float().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=_encode_meta(meta))


def load_adapter(path, model: nn.Module, model_id: str) -> dict:
    """Check metadata and every tensor shape first, then copy the deployed / quarantine tensors in.
    Returns the metadata."""
    meta, tensors = _read_file(path)
    check_meta(meta, model, model_id)
    ads = get_adapters(model)
    for k, a in ads.items():
        for p in (a.DEP, a.QUAR):
            t = tensors.get(f"{k}.{p}")
            want = tuple(getattr(a, p).shape)
            if t is None or tuple(t.shape) != want:
                raise ValueError(f"adapter file {path}: tensor {k}.{p} is "
                                 f"{'missing' if t is None else tuple(t.shape)}, need {want}")
    with torch.no_grad():
        for k, a in ads.items():
            a.dep.copy_(tensors[f"{k}.{a.DEP}"])
            a.quar.copy_(tensors[f"{k}.{a.QUAR}"])
    return meta


def save_directions(path, dirs: dict[str, Tensor], meta: dict) -> None:
    """Per-module direction tensors (float32, the deployed tensor's shape) with metadata (typically
    adapter_meta(model, id) + extras)."""
    for f in META_FIELDS:
        if f not in meta:
            raise ValueError(f"save_directions: meta lacks {f!r}; "
                             "pass adapter_meta(model, model_id) (plus extras)")
    if set(meta["module_keys"]) != set(dirs):
        raise ValueError("save_directions: dirs keys differ from meta['module_keys']; "
                         "build dirs over get_adapters(model)")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in dirs.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=_encode_meta(meta))


def load_directions(path, model: nn.Module, model_id: str) -> dict[str, Tensor]:
    """Check metadata against the model (check_meta(..., directions=True): svd-made directions load into
    a block model of the same ranks and vice versa), then return name -> float32 tensor of the deployed
    tensor's shape (on its device)."""
    meta, tensors = _read_file(path)
    check_meta(meta, model, model_id, directions=True)
    out = {}
    for k, a in get_adapters(model).items():
        t = tensors.get(k)
        want = tuple(a.dep.shape)
        if t is None or tuple(t.shape) != want:
            raise ValueError(f"directions file {path}: tensor {k!r} is "
                             f"{'missing' if t is None else tuple(t.shape)}, need {want}")
        out[k] = t.to(a.dep.device)
    return out


def merge(model: nn.Module) -> dict[str, Tensor]:
    """Base-layout weights for the deployed model: {"<linear name>.weight": W + dW_dep}, the quarantine
    not merged (deploy mode). dW_dep = U diag(delta_S) Vh (svd), U_d diag(delta_S) Vh_d (block), B A (lora).

    Computed in float32, returned in the model dtype. Only the wrapped weights are returned (biases and
    all other parameters are unchanged); the keys are the original model's state_dict keys, so
    `base_model.load_state_dict(merge(model), strict=False)` or an inference-engine weight sync works.
    """
    out = {}
    for k, a in get_adapters(model).items():
        W = a.base.weight.detach()
        out[f"{k}.weight"] = (W.float() + a.delta_weight_parts(True, False)).to(W.dtype)  # (d_out, d_in)
    return out


def unmerge(model: nn.Module, merged: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Inverse of merge: recover the deployed tensor per adapter (float32) from W_merged - W.

    svd / block: delta_S = diag(U_d^T (W_merged - W) Vh_d^T), check value: the largest |off-diagonal| of
    that matrix; lora: A = B^T (W_merged - W), check value: max |(W_merged - W) - B A|. Both ~0 (float
    tolerance) when the merged weights came from this adapter: the inverse check.
    """
    rec, offdiag = {}, {}
    for k, a in get_adapters(model).items():
        dW = merged[f"{k}.weight"].float() - a.base.weight.detach().float()  # (d_out, d_in)
        rec[k], offdiag[k] = a._unmerge(dW)
    return rec, offdiag
