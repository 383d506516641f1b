"""Held-out check of a v_hack file: does it predict the hack-minus-clean gradient on pairs it never saw?

    python scripts/verify_vhack_heldout.py smoke       # tiny-random, out/vhack/smoke-tiny-random.safetensors
                                                         (seconds)
    python scripts/verify_vhack_heldout.py smollm      # SmolLM2-135M, out/vhack/smollm2-135m_mean.safetensors
    python scripts/verify_vhack_heldout.py smollm --vhack out/vhack/smollm2-135m_svd.safetensors
    python scripts/verify_vhack_heldout.py smollm --diffs out/vhack/smollm2-135m_mean_heldout.diffs.pt
        # reuse held-out differences saved by `extract_vhack_grad.py smollm --select heldout` (no model pass)

For each held-out split (default: heldout_within = held-out pairs of the training modes, and
heldout_cross = every pair of the held-out mode), every pair i and wrapped module m:
    c[i, m] = cos(d_i^m, v^m),  d_i^m = dL_hack/d delta_S_m - dL_clean/d delta_S_m
(same loss, normaliser and sign as extract_vhack_grad.py). Reports frac(c > 0), mean and median over all
(i, m), the same per mode, the per-pair cosine of the concatenated (all-module) vectors, and a Haar-random
baseline: `n_random` draws of independent uniform unit vectors per module, whose per-draw median and
frac > 0 give the null distribution (99th percentile by default).

PASS for a split: frac > 0 >= min_frac_pos (0.8) AND median cos > the random baseline's `random_pct`
percentile of the median. Exits 1 if any split in `require` fails, 0 otherwise (the smoke preset requires
none: tiny-random's random weights give no meaningful v_hack, so its rows are informational). Writes
out/vhack/<stem>.verify.json and .verify.md. A missing v_hack file, or one for another model,
exits 2 with one line.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))

import antipasto  # noqa: E402
import cli  # noqa: E402
import extract_vhack_grad as ex  # noqa: E402
import models  # noqa: E402
import pairs as pairs_mod  # noqa: E402


@dataclass
class VerifyConfig:
    """Configuration for scripts/verify_vhack_heldout.py (presets: smoke, smollm, organism, full)."""

    vhack: str = str(_REPO / "out/vhack/smollm2-135m_mean.safetensors")
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    pairs_path: str = str(pairs_mod.DEFAULT_PAIRS)
    splits: tuple[str, ...] = ("heldout_within", "heldout_cross")  # pairs.load_pairs selections
    require: tuple[str, ...] = ("heldout_within", "heldout_cross")  # splits that must pass for exit 0
    max_pairs: int | None = None  # per split, first N in file order (smoke)
    batch_size: int = 4
    n_random: int = 1000  # Haar-random baseline draws
    random_pct: float = 99.0  # percentile of the random median that the real median must beat
    min_frac_pos: float = 0.8
    seed: int = 0
    threads: int = 2
    out_stem: str = ""  # "" -> <vhack file stem>.verify
    diffs: tuple[str, ...] = ()  # .diffs.pt files from extract_vhack_grad.py (e.g. --select heldout) to reuse


PRESETS = {
    "smoke": ("tiny-random against out/vhack/smoke-tiny-random.safetensors (what `just smoke` writes)",
              VerifyConfig(vhack=str(_REPO / "out/vhack/smoke-tiny-random.safetensors"), model="tiny-random",
                           max_pairs=6, batch_size=3, n_random=200, require=())),
    "smollm": ("SmolLM2-135M against out/vhack/smollm2-135m_mean.safetensors", VerifyConfig()),
    "organism": ("the CPU organism against out/vhack/organism.safetensors; requires held-out within-mode",
                 VerifyConfig(vhack=str(_REPO / "out/vhack/organism.safetensors"), model="organism",
                              pairs_path=str(_REPO / "data/pairs/organism_pairs.md"),
                              require=("heldout_within",), threads=1)),
    "full": ("Qwen3-4B (bfloat16, GPU) against out/vhack/qwen3-4b_mean.safetensors", VerifyConfig(
        vhack=str(_REPO / "out/vhack/qwen3-4b_mean.safetensors"), model="Qwen/Qwen3-4B", dtype="bfloat16",
        device="cuda", batch_size=2)),
}


def wrap_like(model, meta: dict) -> None:
    """Wrap `model` with the targets, layers and rank implied by a direction file's module_keys/ranks."""
    keys = list(meta["module_keys"])
    targets = tuple(sorted({k.rsplit(".", 1)[-1] for k in keys}))
    layer_ids = sorted({int(m.group(1)) for k in keys if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", k))})
    antipasto.wrap_model(model, targets=targets, layers=layer_ids or None, rank=max(meta["ranks"]))


def cos_matrix(D: dict[str, torch.Tensor], dirs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(n, M): cos(d_i^m, v^m) for every pair and module (module order of dirs)."""
    return torch.stack([F.cosine_similarity(D[k].float(), dirs[k].float().cpu()[None], dim=1)
                        for k in dirs], dim=1)


def random_baseline(D: dict[str, torch.Tensor], n_random: int, seed: int,
                    chunk: int = 100) -> dict[str, torch.Tensor]:
    """Per draw: median and frac > 0 of cos(d_i^m, r^m)
    with r^m Haar-uniform on the unit sphere per module."""
    g = torch.Generator().manual_seed(seed)
    keys = list(D)
    Dn = {k: F.normalize(D[k].float(), dim=1) for k in keys}  # (n, r) unit rows
    med, frac = [], []
    for s in range(0, n_random, chunk):
        K = min(chunk, n_random - s)
        cols = []
        for k in keys:
            # Gaussian / norm = Haar
            R = F.normalize(torch.randn(K, Dn[k].shape[1], generator=g), dim=1)  # (K, r)
            cols.append(R @ Dn[k].T)  # (K, n)
        C = torch.cat(cols, dim=1)  # (K, n * M)
        med.append(C.median(dim=1).values)
        frac.append((C > 0).float().mean(dim=1))
    return {"median": torch.cat(med), "frac_pos": torch.cat(frac)}


def stats(c: torch.Tensor) -> dict:
    c = c.flatten()
    return {"n": int(c.numel()), "frac_pos": float((c > 0).float().mean()), "mean": float(c.mean()),
            "median": float(c.median())}


def cached_rows(cfg: VerifyConfig, vmeta: dict, plist) -> dict[str, torch.Tensor] | None:
    """Rows for `plist` from cfg.diffs files whose metadata matches the v_hack file, else None."""
    want = [p.id for p in plist]
    for path in cfg.diffs:
        d = torch.load(path, weights_only=False)
        dm = d["meta"]
        for f in antipasto.META_FIELDS:
            if list(dm[f]) != list(vmeta[f]) if isinstance(dm[f], list) else dm[f] != vmeta[f]:
                raise ValueError(f"diffs file {path}: field {f!r} differs from the v_hack file "
                                 f"({dm[f]!r} vs {vmeta[f]!r})")
        if float(dm.get("norm_const", 256.0)) != float(vmeta.get("norm_const", 256.0)):
            raise ValueError(f"diffs file {path}: norm_const differs from the v_hack file")
        ids = list(d["pair_ids"])
        if all(i in ids for i in want):
            rows = [ids.index(i) for i in want]
            return {k: d["diffs"][k][rows] for k in vmeta["module_keys"]}
    return None


def verify(cfg: VerifyConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    # header only, before the model
    cli.check_vhack_file(cfg.vhack, "--vhack", models.model_id(cfg.model), cfg.dtype,
                         models.weights_hash(cfg.model))
    meta, _ = antipasto._read_file(cfg.vhack)
    pf = pairs_mod.load_pair_file(cfg.pairs_path)
    split_pairs = {sp: pairs_mod.select_pairs(pf.pairs, sp)[: cfg.max_pairs] for sp in cfg.splits}
    cached = {sp: cached_rows(cfg, meta, pl) for sp, pl in split_pairs.items()} if cfg.diffs else {}
    if all(cached.get(sp) is not None for sp in cfg.splits):  # everything cached: no model needed
        if meta["model_id"] != models.model_id(cfg.model):
            raise ValueError(f"v_hack file is for model_id {meta['model_id']!r}, config says "
                             f"{models.model_id(cfg.model)!r}")
        _, tensors = antipasto._read_file(cfg.vhack)
        dirs = {k: tensors[k] for k in meta["module_keys"]}
    else:
        if model is None:
            models.check_available(cfg.model)
            model, tokenizer = models.load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        if not antipasto.get_adapters(model):
            wrap_like(model, meta)
        dirs = antipasto.load_directions(cfg.vhack, model, models.model_id(cfg.model))  # runs check_meta
    norm_const = float(meta.get("norm_const", 256.0))
    train_ids = set(meta.get("pair_ids", []))
    report = {"vhack": str(cfg.vhack), "model_id": meta["model_id"], "method": meta.get("method"),
              "pair_set": meta.get("pair_set"), "n_train_pairs": meta.get("n_pairs"), "splits": {},
              "config": asdict(cfg)}
    for split in cfg.splits:
        plist = split_pairs[split]
        leak = sorted(train_ids & {p.id for p in plist})
        assert not leak, f"split {split!r} contains pairs v_hack was extracted from: {leak[:5]}"
        D = cached.get(split)
        if D is None:
            D = ex.pair_diffs(model, tokenizer, plist, cfg.batch_size, norm_const, desc=f"verify {split}",
                              progress=progress)
        C = cos_matrix(D, dirs)  # (n, M)
        flat_d = torch.cat([D[k] for k in dirs], dim=1)  # (n, sum r)
        flat_v = torch.cat([dirs[k].float().cpu() for k in dirs])  # (sum r,)
        per_pair_global = F.cosine_similarity(flat_d, flat_v[None], dim=1)  # (n,)
        rb = random_baseline(D, cfg.n_random, cfg.seed)
        q = cfg.random_pct / 100
        s = stats(C)
        s["random"] = {"n_draws": cfg.n_random,
                       f"median_p{cfg.random_pct:g}": float(torch.quantile(rb["median"], q)),
                       "median_mean": float(rb["median"].mean()),
                       f"frac_pos_p{cfg.random_pct:g}": float(torch.quantile(rb["frac_pos"], q)),
                       "frac_pos_mean": float(rb["frac_pos"].mean())}
        s["random_median_threshold"] = s["random"][f"median_p{cfg.random_pct:g}"]
        s["pass_frac"] = s["frac_pos"] >= cfg.min_frac_pos
        s["pass_median"] = s["median"] > s["random_median_threshold"]
        s["pass"] = bool(s["pass_frac"] and s["pass_median"])
        s["per_pair_global_cos"] = {p.id: round(float(x), 4) for p, x in zip(plist, per_pair_global)}
        s["global_cos_median"] = float(per_pair_global.median())
        s["per_mode"] = {m: stats(C[[i for i, p in enumerate(plist) if p.mode == m]])
                         for m in dict.fromkeys(p.mode for p in plist)}
        leaves = [k.rsplit(".", 1)[-1] for k in dirs]
        s["per_module_type"] = {t: stats(C[:, [j for j, l in enumerate(leaves) if l == t]])
                                for t in dict.fromkeys(leaves)}
        report["splits"][split] = s
    report["seconds"] = round(time.time() - t0, 1)
    report["pass"] = all(report["splits"][sp]["pass"] for sp in cfg.require if sp in report["splits"])
    missing = [sp for sp in cfg.require if sp not in report["splits"]]
    assert not missing, f"require lists splits that were not run: {missing}; add them to splits"
    return report


def to_markdown(r: dict) -> str:
    lines = [f"# v_hack held-out verification: `{Path(r['vhack']).name}`", "",
             f"model `{r['model_id']}`, method `{r['method']}`, extracted from `{r['pair_set']}` "
             f"({r['n_train_pairs']} pairs); {r['seconds']} s; overall **{'PASS' if r['pass'] else 'FAIL'}**"
             + ("" if r["config"]["require"]
                else " (this preset requires no split to pass: the rows below are informational, and "
                     "`pass False` in them is expected on a random-weight model)"), "",
             "| split | n pairs x modules | frac cos>0 | mean cos | median cos | random median p99 | "
             "random frac>0 mean | per-pair global cos median | pass |",
             "|---|---|---|---|---|---|---|---|---|"]
    for sp, s in r["splits"].items():
        lines.append(f"| {sp} | {s['n']} | {s['frac_pos']:.3f} | {s['mean']:.4f} | {s['median']:.4f} | "
                     f"{s['random_median_threshold']:.4f} | {s['random']['frac_pos_mean']:.3f} | "
                     f"{s['global_cos_median']:.4f} | {s['pass']} |")
    for sp, s in r["splits"].items():
        lines += ["", f"## {sp}: per mode", "", "| mode | n | frac cos>0 | mean cos | median cos |",
                  "|---|---|---|---|---|"]
        for m, ms in s["per_mode"].items():
            lines.append(f"| {m} | {ms['n']} | {ms['frac_pos']:.3f} | {ms['mean']:.4f} | "
                         f"{ms['median']:.4f} |")
        lines += ["", "| module type | n | frac cos>0 | mean cos | median cos |", "|---|---|---|---|---|"]
        for m, ms in s["per_module_type"].items():
            lines.append(f"| {m} | {ms['n']} | {ms['frac_pos']:.3f} | {ms['mean']:.4f} | "
                         f"{ms['median']:.4f} |")
    return "\n".join(lines) + "\n"


def main(cfg: VerifyConfig) -> int:
    r = verify(cfg)
    stem = cfg.out_stem or (Path(cfg.vhack).stem + ".verify")
    out = Path(cfg.vhack).parent / stem
    Path(f"{out}.json").write_text(json.dumps(r, indent=1))
    Path(f"{out}.md").write_text(to_markdown(r))
    print(to_markdown(r))
    print(f"wrote {out}.json and {out}.md")
    if not r["pass"]:
        failed = [sp for sp in cfg.require if not r["splits"][sp]["pass"]]
        print(f"FAIL: {failed} below threshold (frac>0 >= {cfg.min_frac_pos} and median > random "
              f"p{cfg.random_pct:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import tyro

    cli.run(lambda: main(tyro.extras.overridable_config_cli(PRESETS)))
