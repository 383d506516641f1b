"""Extract v_hack: the per-module delta_S gradient direction that separates hack from clean completions.

    python extract_vhack_grad.py smoke                  # tiny-random, 6 pairs -> out/vhack/smoke-tiny-random
    python extract_vhack_grad.py smollm                 # SmolLM2-135M, all 36 train pairs (CPU, minutes)
    python extract_vhack_grad.py smollm --method svd --name smollm2-135m_svd
    python extract_vhack_grad.py smollm --select "@mode=overwrite|try_except @split=train" --name smollm_ow_te

For every pair (data/pairs/hack_pairs.md, docs/pairs.md) and each side s in {hack, clean}:
    L_s = sum_{t in completion} -log p(y_t | y_<t) / C
over the assistant completion tokens only (the system + user messages go through the chat template,
the completion ends with the template's end-of-turn token, which is included), with the SAME constant
C (`norm_const`) on both sides and for every pair (Dr.GRPO-style "sum / constant", see docs/pairs.md for
why not a per-token mean). The per-pair difference d_i = dL_hack/d delta_S - dL_clean/d delta_S is taken
per wrapped module at delta_S = 0 (the base model), with per-sample gradients from one batched backward
(antipasto.capture_per_sample). Aggregation per module:
    mean   v = mean_i d_i
    svd    v = top right singular vector of the stacked (n, r) d_i, sign chosen so that most d_i . v > 0
then v /= |v|. Sign convention: v points along +grad(NLL_hack - NLL_clean). A policy-gradient loss
gradient that reinforces a hack rollout (advantage A > 0: g = A * grad NLL_hack) then has g . v > 0, which
is what antipasto.surgery's one-sided erase (`if g.v > 0`) expects; see docs/pairs.md, "Sign convention".

Writes out/vhack/<name>.safetensors (module-name keys, (r,) float32 unit vectors) via
antipasto.save_directions with metadata {model_id, dtype, module_keys, ranks, git_sha, pair_set, n_pairs,
method, ..., and for the organism its build's weights_hash}; train.py checks the header first
(cli.check_vhack_file) and loads it with antipasto.load_directions (which runs antipasto.check_meta).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor
from tqdm import tqdm

import antipasto
import cli
import grpo
import models
import pairs as pairs_mod

_REPO = Path(__file__).resolve().parent
SIDES = pairs_mod.SIDES


@dataclass
class ExtractConfig:
    """Configuration for extract_vhack_grad.py (presets: smoke, smollm, organism, full)."""

    model: str = "smollm2-135m"  # models.load_model name: tiny-random | smollm2-135m | HF id | path
    dtype: str = "float32"
    device: str = "cpu"
    pairs_path: str = str(pairs_mod.DEFAULT_PAIRS)
    select: str = "train"  # pairs.load_pairs selection: named set or @key=value terms
    max_pairs: int | None = None  # keep the first N selected pairs (file order) — for smoke runs
    method: Literal["mean", "svd"] = "mean"
    targets: tuple[str, ...] = antipasto.DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None  # None = all layers
    rank: int | None = None  # None = full rank (what train.py wraps with by default)
    batch_size: int = 4  # pairs per forward/backward (2x sequences: hack and clean)
    norm_const: float = 256.0  # C in L = sum_t NLL_t / C, identical for hack, clean and every pair
    seed: int = 0
    threads: int = 2  # torch CPU threads
    name: str = ""  # output stem; "" -> "<model>_<method>_<select>"
    out_dir: str = str(_REPO / "out/vhack")
    save_diffs: bool = True  # also write <name>.diffs.pt: per-pair (n, r) differences per module
    from_diffs: str = ""  # re-aggregate a saved <name>.diffs.pt (e.g. svd from a mean run) without the model

    def stem(self) -> str:
        if self.name:
            return self.name
        sel = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.select.replace("@", "")).strip("_")
        base = f"{Path(self.model).name}_{self.method}"
        return (base if self.select == "train" and self.max_pairs is None
                else f"{base}_{sel or 'all'}{'' if self.max_pairs is None else f'_n{self.max_pairs}'}")


PRESETS = {
    "smoke": ("tiny-random, 6 train pairs, fast (the file scripts/smoke.py writes)", ExtractConfig(
        model="tiny-random", max_pairs=6, batch_size=3, name="smoke-tiny-random")),
    "smollm": ("SmolLM2-135M-Instruct, all train pairs, CPU", ExtractConfig(model="smollm2-135m")),
    "organism": ("the CPU organism, its own pairs (data/pairs/organism_pairs.md), one thread", ExtractConfig(
        model="organism", pairs_path=str(_REPO / "data/pairs/organism_pairs.md"), method="mean", threads=1,
        name="organism")),
    "full": ("Qwen3-4B in bfloat16 on one GPU (the dtype must match train.py's full preset)", ExtractConfig(
        model="Qwen/Qwen3-4B", dtype="bfloat16", device="cuda", batch_size=2, name="qwen3-4b_mean")),
}


# ---------------------------------------------------------------------------------------------- encoding
@jaxtyped(typechecker=beartype)
def completion_nll(
    logits: Float[Tensor, "B T V"], ids: Tensor, n_prompt: Tensor, lengths: Tensor, norm_const: float
) -> Float[Tensor, "B"]:
    """Per-sequence sum of completion-token NLL / norm_const. ids (B, T) right-padded."""
    B, T, _ = logits.shape
    pos = torch.arange(1, T, device=ids.device)[None, :]  # (1, T-1) index of the predicted token
    mask = (pos >= n_prompt[:, None]) & (pos < lengths[:, None])  # (B, T-1) completion tokens only
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                          reduction="none")
    nll = nll.view(B, T - 1)  # (B, T-1)
    return (nll * mask).sum(dim=1) / norm_const  # (B,)


def side_grads(model, batch: list[tuple[list[int], int]], pad_id: int,
               norm_const: float) -> dict[str, Tensor]:
    """Per-sequence dL/d delta_S for a batch of (ids, n_prompt); returns name -> (B, r) float32.

    Right padding (causal attention: pads after a sequence cannot affect it; positions stay 0..L-1).
    Also checks that the per-sample grads sum to the autograd delta_S.grad.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids, _ in batch], device=device)  # (B,)
    n_prompt = torch.tensor([n for _, n in batch], device=device)  # (B,)
    ids, attn, _ = grpo.pad_right([seq for seq, _ in batch], [n for _, n in batch],
                                  pad_id, device)  # (B, T) x3
    ads = antipasto.get_adapters(model)
    model.zero_grad(set_to_none=True)
    with antipasto.capture_per_sample(model) as cap:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
        loss = completion_nll(logits, ids, n_prompt, lengths, norm_const)  # (B,)
        loss.sum().backward()
    assert set(cap.grads) == set(ads), (
        f"per-sample capture missed modules: {sorted(set(ads) - set(cap.grads))[:3]}")
    grads = {name: cap.grads[name] for name in ads}  # model order (hooks fire in backward order)
    assert set(grads) == set(ads), f"per-sample capture missed modules: {sorted(set(ads) - set(grads))[:3]}"
    for name, a in ads.items():
        assert a.delta_S.grad is not None, f"{name}: delta_S got no gradient"
        # (B, r) vs (r,)
        antipasto.check_per_sample_sum(name, grads[name], a.delta_S.grad, a.S.dtype, atol=1e-6)
    model.zero_grad(set_to_none=True)
    return grads


def pair_diffs(model, tokenizer, pair_list, batch_size: int = 4, norm_const: float = 256.0,
               desc: str = "pairs", progress: bool = True) -> dict[str, Tensor]:
    """name -> (n_pairs, r) float32 rows d_i = dL_hack/d delta_S - dL_clean/d delta_S, at the current
    delta_S."""
    assert batch_size >= 1, "batch_size must be >= 1"
    assert pair_list, "pair_diffs: no pairs"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [(pairs_mod.encode_side(tokenizer, p, "hack"), pairs_mod.encode_side(tokenizer, p, "clean"))
           for p in pair_list]
    out: dict[str, list[Tensor]] = {}
    model.eval()
    for s in tqdm(range(0, len(enc), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = enc[s : s + batch_size]
        n = len(chunk)
        g = side_grads(model, [h for h, _ in chunk] + [c for _, c in chunk], pad_id, norm_const)
        for name, gb in g.items():  # gb (2n, r): hacks then cleans
            out.setdefault(name, []).append((gb[:n] - gb[n:]).cpu())  # (n, r)
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- aggregation
@jaxtyped(typechecker=beartype)
def aggregate(D: Float[Tensor, "n r"], method: str) -> Float[Tensor, "r"]:
    """Unit direction from stacked per-pair differences (see module docstring)."""
    if method == "mean":
        v = D.mean(0)  # (r,)
    elif method == "svd":
        _, _, Vh = torch.linalg.svd(D.double(), full_matrices=False)  # Vh (k, r)
        v = Vh[0].float()  # (r,)
        proj = D @ v  # (n,)
        pos, neg = int((proj > 0).sum()), int((proj < 0).sum())
        # majority sign; ties by the summed projection
        if neg > pos or (neg == pos and float(proj.sum()) < 0):
            v = -v
    else:
        raise ValueError(f"method must be 'mean' or 'svd', got {method!r}")
    norm = float(v.norm())
    assert math.isfinite(norm) and norm > 0, f"aggregate: direction has norm {norm} (all differences zero?)"
    return v / norm


def extract(cfg: ExtractConfig, model=None, tokenizer=None, progress: bool = True) -> tuple[Path, dict]:
    """Run the extraction; returns (path written, metadata). Pass model/tokenizer to reuse a loaded (wrapped)
    model."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    if cfg.from_diffs:
        if not Path(cfg.from_diffs).is_file():
            raise cli.UserError(f"--from-diffs={cfg.from_diffs!r} does not exist; pass a <name>.diffs.pt "
                                "written by an earlier extraction (--save-diffs)")
        return reaggregate(cfg)
    if not Path(cfg.pairs_path).is_file():
        raise cli.UserError(f"--pairs-path={cfg.pairs_path!r} does not exist "
                            f"(default {pairs_mod.DEFAULT_PAIRS})")
    if cfg.max_pairs is not None and cfg.max_pairs < 1:
        raise cli.UserError(f"--max-pairs={cfg.max_pairs}: need >= 1 (or leave it unset for all pairs)")
    cli.check_ranges(cfg, {}, {"dtype": tuple(models.DTYPES)})
    try:
        pf = pairs_mod.load_pair_file(cfg.pairs_path)
    except ValueError as e:  # a hand-edited pair file that does not parse: the parser names the line
        raise cli.UserError(f"--pairs-path={cfg.pairs_path!r}: {e}") from None
    try:
        plist = pairs_mod.select_pairs(pf.pairs, cfg.select)
    except ValueError as e:  # a selection that matches nothing or is malformed
        raise cli.UserError(f"--select={cfg.select!r}: {e}; named sets {sorted(pairs_mod.NAMED_SETS)}, "
                            f"modes in {cfg.pairs_path}: {sorted(pf.modes)}") from None
    if cfg.max_pairs is not None:
        assert cfg.max_pairs >= 1, "max_pairs must be >= 1 (or None for all)"
        plist = plist[: cfg.max_pairs]
    if model is None:
        models.check_available(cfg.model)
        print(f"loading model {cfg.model} ({cfg.dtype}, {cfg.device}); a hub model downloads first",
              flush=True)
        t_load = time.time()
        model, tokenizer = models.load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        print(f"model loaded in {time.time() - t_load:.0f}s; {len(plist)} pairs to extract from", flush=True)
    assert tokenizer is not None, "pass the tokenizer together with the model"
    if not antipasto.get_adapters(model):
        antipasto.wrap_model(model, targets=cfg.targets, layers=cfg.layers, rank=cfg.rank)
    for name, a in antipasto.get_adapters(model).items():
        if getattr(a, "kind", "svd") != "svd":
            raise ValueError(f"{name}: v_hack extraction is defined for kind='svd' adapters (delta_S), "
                             f"got kind={a.kind!r}")
        assert (float(a.delta_S.detach().abs().max()) == 0
                and float(a.delta_S_hack.detach().abs().max()) == 0), \
            "extract: delta_S must be zero (the base model); pass a freshly wrapped model"
    D = pair_diffs(model, tokenizer, plist, cfg.batch_size, cfg.norm_const, desc=f"extract {cfg.method}",
                   progress=progress)
    dirs = {k: aggregate(D[k], cfg.method) for k in antipasto.get_adapters(model)}
    mid = models.model_id(cfg.model)
    meta = antipasto.adapter_meta(model, mid)
    meta.update({
        "pair_set": cfg.select, "n_pairs": len(plist), "method": cfg.method,
        "pair_ids": [p.id for p in plist],
        "pairs_path": (str(Path(cfg.pairs_path).resolve().relative_to(_REPO))
                       if Path(cfg.pairs_path).resolve().is_relative_to(_REPO) else str(cfg.pairs_path)),
        "norm_const": cfg.norm_const, "seed": cfg.seed,
        **({"weights_hash": wh} if (wh := models.weights_hash(cfg.model)) else {}),
        "loss": "sum completion NLL / norm_const, incl. end-of-turn",
        "sign": "+grad(NLL_hack) - grad(NLL_clean)",
    })
    out = Path(cfg.out_dir) / f"{cfg.stem()}.safetensors"
    antipasto.save_directions(out, dirs, meta)
    if cfg.save_diffs:
        torch.save({"diffs": D, "pair_ids": [p.id for p in plist], "modes": [p.mode for p in plist],
                    "meta": meta}, out.with_suffix(".diffs.pt"))
    # a summary: how consistent the per-pair differences are with the direction (in-sample)
    cos = torch.cat([F.cosine_similarity(D[k], dirs[k][None], dim=1) for k in dirs])  # (n * modules,)
    summary = {"path": str(out), "n_pairs": len(plist), "n_modules": len(dirs),
               "seconds": round(time.time() - t0, 1), "in_sample_frac_pos": float((cos > 0).float().mean()),
               "in_sample_median_cos": float(cos.median())}
    (out.with_suffix(".json")).write_text(json.dumps({"config": asdict(cfg), "summary": summary,
                                                      "meta": meta}, indent=1, default=str))
    return out, summary


def reaggregate(cfg: ExtractConfig) -> tuple[Path, dict]:
    """Directions from a saved .diffs.pt (same pairs, model and metadata), aggregated with cfg.method."""
    d = torch.load(cfg.from_diffs, weights_only=False)
    meta = dict(d["meta"])
    D = {k: d["diffs"][k] for k in meta["module_keys"]}
    dirs = {k: aggregate(D[k], cfg.method) for k in meta["module_keys"]}
    meta.update(method=cfg.method, git_sha=antipasto.git_sha(), from_diffs=str(cfg.from_diffs))
    out = Path(cfg.out_dir) / f"{cfg.stem()}.safetensors"
    antipasto.save_directions(out, dirs, meta)
    cos = torch.cat([F.cosine_similarity(D[k], dirs[k][None], dim=1) for k in dirs])
    summary = {"path": str(out), "n_pairs": meta["n_pairs"], "n_modules": len(dirs),
               "from_diffs": str(cfg.from_diffs), "in_sample_frac_pos": float((cos > 0).float().mean()),
               "in_sample_median_cos": float(cos.median())}
    out.with_suffix(".json").write_text(json.dumps({"config": asdict(cfg), "summary": summary, "meta": meta},
                                                   indent=1, default=str))
    return out, summary


if __name__ == "__main__":
    import tyro

    def _main() -> None:
        path, summary = extract(tyro.extras.overridable_config_cli({k: v for k, v in PRESETS.items()}))
        print(json.dumps(summary, indent=1))

    cli.run(_main)
