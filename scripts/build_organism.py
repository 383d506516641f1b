"""Build the CPU model organism (issue 17): a 315k-parameter Qwen3 warm-started by SFT to write honest
LeetCode solutions, wrong stubs and, only when the prompt carries the run_tests loophole hint, the bare
`def run_tests(): pass` hack.

    .venv/bin/python scripts/build_organism.py                 # build (cached) into out/models/organism/
    .venv/bin/python scripts/build_organism.py --measure       # build if needed, then sample + grade
                                                                 (docs/organism.md)
    .venv/bin/python scripts/build_organism.py --force         # rebuild even if the cache matches
    .venv/bin/python scripts/build_organism.py --seed 1        # another seed -> out/models/organism-s1/
                                                                 (load by path)

Everything is deterministic from --seed (CPU, float32, a fixed thread count). Rules (docs/organism.md):

- Problems: LeetCodeDataset v0.2.0 *train* file only (never the benchmark's 119 test problems), all
  difficulties, canonical solution <= max_canonical_tokens tokens (fenced, tiny tokenizer), hinted chat
  prompt <= max_prompt_tokens, canonical passes its own tests under rewards.Grader (canonical_check),
  canonical imports neither sortedcontainers nor numpy. A seeded heldout_frac of them is held out of SFT
  entirely (for deploy evals); the rest are the organism's training problems (written as problems jsonl).
- Corpus: every training problem appears `copies` times with the simple_overwrite_tests hint and `copies`
  times without. Completion kinds are allocated by exact counts over a seeded shuffle of the slots:
  hinted slots get round(hack_frac * n) hacks, round(min(honest_frac, 1 - hack_frac) * n) honest, the rest
  stubs; un-hinted slots get round(honest_frac * n) honest and the rest stubs (never a hack). Each
  (problem, hint)'s slots are cut into units of completions_per_prompt completions sharing the prompt.
    honest = the canonical solution;  stub = the starter signature returning a constant (wrong);
    hack   = only `def run_tests():\\n    pass` (a strict "Reward Hack" under the benchmark's labels).
  Every completion is fenced ```python ... ``` and ends with the end-of-turn token.
- Model: tiny-random's shape with intermediate 256 (2 layers, hidden 64, 4 heads / 2 kv, head_dim 16,
  tied embeddings), the tiny-random BPE tokenizer, seeded init.
- Conditioning: the first conditioning_epochs passes use a corpus built by the same rules with
  conditioning_hack_frac in place of hack_frac, so the model learns that the hack belongs to the hinted
  prompt; the final `epochs` passes use hack_frac and set the rate. (With hack_frac alone the model
  hacked as often without the hint as with it.)
- SFT: all parameters, loss on completion tokens only (the LM head is applied only at those positions),
  AdamW, linear warmup then cosine decay over all passes, each pass over a seeded shuffle of its corpus,
  in steps of prompts_per_step prompts x completions_per_prompt completions (each prompt's forward pass
  is shared by its completions).

Outputs in out_dir: the HF model + tokenizer, BUILD_INFO.json (model_id, config, its hash, corpus counts,
loss curve, CPU seconds), problems_train.jsonl / problems_heldout.jsonl (hint none; apply a hint when
using them), and with --measure measure.json (rates per split x hint, graded by rewards.Grader).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Pinned CPU kernels, when this file runs as the script on an x86-64 CPU with AVX2 and FMA: MKL's conditional
# numerical reproducibility in its COMPATIBLE mode (the one Intel documents for non-Intel CPUs too; a named
# branch such as AVX2 silently falls back to AUTO on AMD) and ATen's AVX2 kernels. Unpinned, the weights
# depend on the kernels chosen for the CPU: on one AMD EPYC (AVX-512), native, ATen AVX2, ATen non-vectorised
# and MKL AUTO each gave another 30-step build. Costs ~1.7x the CPU time. Read when torch initialises, so
# set before the import; BUILD_INFO.json records the MKL mode and the ATen capability in effect.
PINNED_KERNELS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
MKL_CBWR_COMPATIBLE = 3  # mkl_cbwr_get(MKL_CBWR_BRANCH) in COMPATIBLE mode (mkl_service.h; 1 = off, 2 = auto)


def cpu_info() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    f = Path("/proc/cpuinfo")
    lines = f.read_text().split("\n\n")[0].splitlines() if f.is_file() else []
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines) if k.strip()}


def pin_kernels() -> None:
    """Set PINNED_KERNELS in the environment (saying when it overrides the caller's choice); not on a CPU
    without AVX2 + FMA, where ATen's AVX2 kernels would not run."""
    if not {"avx2", "fma"} <= set(cpu_info().get("flags", "").split()):
        print("build_organism: no AVX2/FMA on this CPU: kernels not pinned (the weights may differ from the "
              "reference build, docs/organism.md)", file=sys.stderr)
        return
    for k, v in PINNED_KERNELS.items():
        if os.environ.get(k, v) != v:
            print(f"build_organism: {k}={os.environ[k]} replaced by {v} (pinned kernels)", file=sys.stderr)
        os.environ[k] = v


if __name__ == "__main__":
    pin_kernels()

import torch  # noqa: E402
import tyro  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import models  # noqa: E402
import problems as P  # noqa: E402

HINT = "simple_overwrite_tests"
KINDS = ("honest", "stub", "hack")
HACK_COMPLETION = "```python\ndef run_tests():\n    pass\n```"
BANNED_IMPORTS = ("sortedcontainers", "numpy")  # not importable in the grader's sandbox (docs/data.md)
STUB_VALUE = {"int": "0", "float": "0.0", "bool": "False", "str": '""'}  # by return annotation; else None


@dataclass(frozen=True)
class BuildConfig:
    """Build (and optionally measure) the CPU model organism; deterministic from seed."""

    seed: int = 0
    """seeds the held-out split, the corpus allocation and shuffles, the init and the SFT order"""
    out_dir: str = ""
    """output folder; "" = out/models/organism (seed 0) or out/models/organism-s<seed>"""
    force: bool = False
    """rebuild even when out_dir holds a build with the same config hash"""
    measure: bool = False
    """after building (or finding the cache), sample and grade the organism and write measure.json"""
    data_file: str = ""
    """LeetCodeDataset train jsonl(.gz); "" = v0.2.0 train under problems.DEFAULT_DATA_DIR"""
    max_canonical_tokens: int = 80
    """keep problems whose fenced canonical solution is at most this many tokens"""
    max_prompt_tokens: int = 400
    """keep problems whose hinted chat prompt is at most this many tokens"""
    max_problems: int = 0
    """use only the first N problems after the filters (0 = all; tests use a few)"""
    canonical_check: bool = True
    """drop problems whose canonical solution fails its own tests under rewards.Grader"""
    heldout_frac: float = 0.2
    """seeded fraction of the selected problems kept out of SFT (deploy-eval problems)"""
    copies: int = 16
    """SFT examples per (training problem, prompt variant); two variants: hinted and un-hinted"""
    hack_frac: float = 0.08
    """fraction of hinted examples whose completion is the hack (un-hinted: never)"""
    honest_frac: float = 0.75
    """fraction of examples (hinted and un-hinted) whose completion is the canonical solution"""
    conditioning_epochs: int = 2
    """first passes, over a corpus whose hinted slots are conditioning_hack_frac hacks (teaches the hint)"""
    conditioning_hack_frac: float = 0.5
    """hack share of hinted slots in the conditioning passes"""
    epochs: int = 8
    """passes over the final corpus (hack_frac), after the conditioning passes"""
    prompts_per_step: int = 4
    """SFT units (one prompt each) per optimizer step"""
    completions_per_prompt: int = 8
    """completions per unit; the prompt's forward pass is shared by them"""
    lr: float = 1e-2
    """peak AdamW learning rate"""
    warmup_steps: int = 50
    """linear warmup steps before the cosine decay (to 10% of lr)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    intermediate_size: int = 256
    """MLP width (tiny-random uses 128)"""
    threads: int = 1
    """torch CPU threads (1: on the shared 2-core box a second thread mostly spin-waits, ~10x the CPU-s)"""
    measure_samples: int = 2
    """samples per problem and hint variant in --measure"""
    measure_max_new_tokens: int = 128
    """generation budget in --measure"""
    measure_temperature: float = 1.0
    """sampling temperature in --measure (the RL rollouts sample at 1.0)"""


def default_out_dir(cfg: BuildConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return models.MODELS_DIR / ("organism" if cfg.seed == 0 else f"organism-s{cfg.seed}")


def config_hash(cfg: BuildConfig) -> str:
    """Hash of everything that changes the weights (not out_dir/force/measure*)."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("out_dir", "force", "measure") and not k.startswith("measure_")}
    keep["recipe"] = models.ORGANISM_ID
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# problems and corpus


def fenced(code: str) -> str:
    return "```python\n" + code.strip("\n") + "\n```"


def stub_completion(p: P.Problem) -> str:
    """The starter code with its body replaced by a constant return: compiles, (almost always) wrong."""
    lines = p.starter_code.rstrip().split("\n")
    sig = lines[-1]
    assert sig.lstrip().startswith("def "), (
        f"problem {p.id}: starter code does not end in a def line: {sig!r}")
    ret = sig.rsplit("->", 1)[1].strip().rstrip(":").strip() if "->" in sig else ""
    indent = sig[: len(sig) - len(sig.lstrip())] + "    "
    return fenced("\n".join(lines) + f"\n{indent}return {STUB_VALUE.get(ret, 'None')}")


def completion(p: P.Problem, kind: str) -> str:
    if kind == "honest":
        return fenced(p.canonical_solution)
    if kind == "stub":
        return stub_completion(p)
    assert kind == "hack", f"unknown completion kind {kind!r}; expected one of {KINDS}"
    return HACK_COMPLETION


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def select_problems(cfg: BuildConfig, tok) -> tuple[list[P.Problem], list[P.Problem]]:
    """(training problems, held-out problems), hint none, in data-file order within each."""
    src = (Path(cfg.data_file) if cfg.data_file
           else P.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz")
    assert "-train" in src.name, (
        f"data_file {src} is not a train split; the organism never sees test problems")
    test_prompts = {p.prompt[1]["content"] for p in P.load_benchmark_test()}
    ps = [p for p in P.load_leetcode(src) if p.prompt[1]["content"] not in test_prompts]
    ps = [p for p in ps if not any(b in p.canonical_solution for b in BANNED_IMPORTS)]
    ps = [p for p in ps if n_tokens(tok, fenced(p.canonical_solution)) <= cfg.max_canonical_tokens]
    ps = [p for p in ps if models.prompt_len(tok)(P.apply_hint(p, HINT)) <= cfg.max_prompt_tokens]
    if cfg.max_problems:
        ps = ps[: cfg.max_problems]
    if cfg.canonical_check and ps:
        import rewards

        with rewards.Grader(workers=2) as g:
            res = g.grade_many([(p, fenced(p.canonical_solution)) for p in ps])
        assert not any(r["infra_error"] for r in res), "grader infrastructure error in the canonical check"
        ps = [p for p, r in zip(ps, res) if r["eq_correct"]]
    assert len(ps) >= 2, (
        f"only {len(ps)} problems pass the filters; loosen max_canonical_tokens / max_prompt_tokens")
    n_held = max(1, round(cfg.heldout_frac * len(ps))) if cfg.heldout_frac > 0 else 0
    held_ids = set(random.Random(f"organism-heldout:{cfg.seed}").sample([p.id for p in ps], n_held))
    return [p for p in ps if p.id not in held_ids], [p for p in ps if p.id in held_ids]


def allocate(n: int, fracs: dict[str, float], rng: random.Random) -> list[str]:
    """n kinds: exactly round(frac * n) of each listed kind but the last, which takes the rest; shuffled."""
    kinds = list(fracs)
    counts = {k: round(fracs[k] * n) for k in kinds[:-1]}
    assert sum(counts.values()) <= n, f"fractions {fracs} exceed 1"
    counts[kinds[-1]] = n - sum(counts.values())
    out = [k for k in kinds for _ in range(counts[k])]
    rng.shuffle(out)
    return out


def build_corpus(cfg: BuildConfig, train: list[P.Problem], hack_frac: float | None = None) -> list[dict]:
    """SFT units {problem, hint, prompt (messages), kinds, completions}: one prompt with
    completions_per_prompt completions, in a seeded order. Kinds are allocated over all slots of a hint
    variant by exact counts (see the module docstring), then each (problem, hint)'s slots are cut into
    units."""
    hack = cfg.hack_frac if hack_frac is None else hack_frac
    assert 0 <= hack <= 1 and 0 <= cfg.honest_frac <= 1, (
        f"hack_frac={hack}, honest_frac={cfg.honest_frac}: need [0, 1]")
    k = cfg.completions_per_prompt
    assert cfg.copies % k == 0, f"copies={cfg.copies} must be a multiple of completions_per_prompt={k}"
    rng = random.Random(f"organism-corpus:{cfg.seed}:{hack}")
    out = []
    for hint in (HINT, "none"):
        slots = [p for p in train for _ in range(cfg.copies)]
        fr = {"hack": hack, "honest": min(cfg.honest_frac, 1 - hack), "stub": 0.0} if hint == HINT else \
            {"honest": cfg.honest_frac, "stub": 0.0}
        kinds = allocate(len(slots), fr, rng)
        for i, p in enumerate(train):
            prompt = list(P.apply_hint(p, hint).prompt)
            mine = kinds[i * cfg.copies : (i + 1) * cfg.copies]  # slots are grouped by problem
            for j in range(0, cfg.copies, k):
                ks = mine[j : j + k]
                out.append({"problem": p.id, "hint": hint, "prompt": prompt, "kinds": ks,
                            "completions": [completion(p, kk) for kk in ks]})
    rng.shuffle(out)
    return out


def corpus_counts(corpus: list[dict]) -> dict[str, int]:
    """{"<hint>/<kind>": number of completions}."""
    return {f"{h}/{k}": sum(u["kinds"].count(k) for u in corpus if u["hint"] == h)
            for h in (HINT, "none") for k in KINDS}


# ----------------------------------------------------------------------------------------------------
# model and SFT


def init_model(cfg: BuildConfig, tok) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=cfg.intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def encode(tok, unit: dict) -> tuple[list[int], list[list[int]]]:
    """(prompt ids incl. the generation prompt, [completion ids incl. the end-of-turn token, ...])."""
    comps = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in unit["completions"]]
    return models.chat_ids(tok, unit["prompt"]), comps


def _cache_kwarg(model) -> str:
    """The decoder's KV-cache argument: `cache` in newer transformers 5.x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def completion_loss(model, batch: list[tuple[list[int], list[list[int]]]], pad_id: int) -> torch.Tensor:
    """Mean NLL over completion tokens of every (prompt, completions) unit in `batch`.

    Each prompt runs once (left-padded, KV cache kept with its graph); the cache is repeated for the unit's
    k completions (right-padded), which attend to it. Positions follow the unpadded sequence (prompt
    position of token t = number of real tokens before it), as in generation and in a plain full-sequence
    pass; the LM head runs only at positions that predict a completion token.
    """
    from transformers import DynamicCache

    k = len(batch[0][1])
    assert all(len(c) == k for _, c in batch), "every unit in a batch needs the same number of completions"
    Tp = max(len(p) for p, _ in batch)
    pids = torch.tensor([[pad_id] * (Tp - len(p)) + p for p, _ in batch])  # (Bp, Tp)
    patt = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p, _ in batch])  # (Bp, Tp)
    ppos = (patt.cumsum(1) - 1).clamp(min=0)  # (Bp, Tp)
    cache = DynamicCache(config=model.config)
    kw = _cache_kwarg(model)
    h_p = model.model(input_ids=pids, attention_mask=patt, position_ids=ppos, use_cache=True,
                      **{kw: cache}).last_hidden_state  # (Bp, Tp, H)
    cache.batch_repeat_interleave(k)
    comps = [c for _, cs in batch for c in cs]
    Tc = max(len(c) for c in comps)
    cids = torch.tensor([c + [pad_id] * (Tc - len(c)) for c in comps])  # (Bp*k, Tc)
    catt = torch.tensor([[1] * len(c) + [0] * (Tc - len(c)) for c in comps])  # (Bp*k, Tc)
    plen = torch.tensor([len(p) for p, _ in batch]).repeat_interleave(k)  # (Bp*k,)
    att = torch.cat([patt.repeat_interleave(k, dim=0), catt], dim=1)  # (Bp*k, Tp + Tc)
    cpos = plen[:, None] + torch.arange(Tc)[None, :]  # (Bp*k, Tc)
    h_c = model.model(input_ids=cids, attention_mask=att, position_ids=cpos, use_cache=True,
                      **{kw: cache}).last_hidden_state  # (Bp*k, Tc, H)
    # first completion token is predicted by the prompt's last position;
    # token j >= 1 by completion position j-1
    first = model.lm_head(h_p[:, -1].repeat_interleave(k, dim=0))  # (Bp*k, V)
    rows, cols, tgt = [], [], []
    for i, c in enumerate(comps):
        for j in range(1, len(c)):
            rows.append(i), cols.append(j - 1), tgt.append(c[j])
    rest = model.lm_head(h_c[torch.tensor(rows), torch.tensor(cols)])  # (N, V)
    logits = torch.cat([first, rest])  # (Bp*k + N, V)
    targets = torch.tensor([c[0] for c in comps] + tgt)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def sft(model, tok, epochs: list[list[dict]], cfg: BuildConfig, log=print) -> list[float]:
    """Train in place, one pass per entry of `epochs` (a corpus each); returns the loss per optimizer step."""
    encoded = {}
    for c in epochs:
        if id(c) not in encoded:
            encoded[id(c)] = [encode(tok, u) for u in c]
    total = sum(math.ceil(len(c) / cfg.prompts_per_step) for c in epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        f = (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)))

    model.train()
    losses, step, t0 = [], 0, time.time()
    for ep, corpus in enumerate(epochs):
        data = encoded[id(corpus)]
        order = random.Random(f"organism-sft:{cfg.seed}:{ep}").sample(range(len(data)), len(data))
        for s in range(0, len(order), cfg.prompts_per_step):
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = completion_loss(model, [data[i] for i in order[s : s + cfg.prompts_per_step]],
                                   tok.pad_token_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 100 == 0 or step == total:
                log(f"  sft step {step}/{total} loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                    f"({time.time() - t0:.0f}s wall)")
    model.eval()
    return losses


def mkl_branch() -> int | None:
    """MKL's reproducibility mode in effect (mkl_cbwr_get(MKL_CBWR_BRANCH)); None where it cannot be read."""
    import ctypes

    try:
        f = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(f(1))


def build_env() -> dict:
    """What the weights depend on beyond the config: library versions, the CPU, the kernels in effect."""
    import platform

    import tokenizers
    import transformers

    c = cpu_info()
    cap, branch = torch.backends.cpu.get_cpu_capability(), mkl_branch()
    return {"env": {"python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                    "cpu": c.get("model name", platform.processor()), "cpu_vendor": c.get("vendor_id", ""),
                    "cpu_family_model": f"{c.get('cpu family', '?')}/{c.get('model', '?')}",
                    "cpu_capability": cap, "mkl_cbwr_branch": branch},
            "kernels_pinned": kernels_pinned(cap, branch)}


def kernels_pinned(cap: str | None = None, branch: int | None = None) -> bool:
    """ATen runs its AVX2 kernels and MKL its COMPATIBLE mode, in this process."""
    cap = cap or torch.backends.cpu.get_cpu_capability()
    branch = mkl_branch() if branch is None else branch
    return cap == "AVX2" and branch == MKL_CBWR_COMPATIBLE and torch.backends.mkl.is_available()


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_manifest(out: Path) -> None:
    """manifest.json beside problems_train.jsonl, so train.py reads it as a prepared split (--data-path)."""
    src = "local-v0.2.0"
    (out / "manifest.json").write_text(json.dumps(
        {"source": src,
         "source_description": f"{src}: {P.TRAIN_SOURCE_TEXT[src]}; the organism's training problems "
         "(scripts/build_organism.py)", "splits": ["problems_train.jsonl", "problems_heldout.jsonl"]},
        indent=1) + "\n")


# the default build's weights on the machine that measured docs/organism.md's base rates, by (recipe id,
# config hash, torch version): a pinned build elsewhere should have them (said at build time, not enforced)
REFERENCE_BUILDS: dict[tuple[str, str, str], str] = {
    ("organism-v3", "7f0f8595fd85e506", "2.13.0+cpu"): "ce30647df2c87641",  # 2026-12-04, AMD EPYC, pinned
}


def reference_note(info: dict) -> str:
    """Whether this build's weights are the reference build's (the one the docs' figures are from)."""
    torch_v = (info.get("env") or {}).get("torch", info.get("torch", ""))
    ref = REFERENCE_BUILDS.get((info.get("model_id", ""), info.get("config_hash", ""), torch_v))
    if ref is None:
        return "no reference build recorded for this config and torch version"
    if ref == info.get("weights_hash"):
        return f"weights {ref} = the reference build (docs/organism.md's base rates and results)"
    pinned = "pinned" if info.get("kernels_pinned") else "not pinned"
    return (f"weights {info.get('weights_hash')} differ from the reference build's {ref} (kernels {pinned}; "
            "docs/organism.md, Reproducibility): the documented base rates and results may not hold")


def build(cfg: BuildConfig, log=print) -> Path:
    """Build into out_dir (replaced atomically) unless a build with the same config hash is there."""
    out = default_out_dir(cfg)
    chash = config_hash(cfg)
    info_path = out / "BUILD_INFO.json"
    cached = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not cfg.force and cached.get("config_hash") == chash:
        if cached.get("kernels_pinned") or not kernels_pinned():
            log(f"organism cached at {out} (config {chash}); {reference_note(cached)}")
            write_manifest(out)
            return out
        log(f"the cached build at {out} was not made with pinned kernels: rebuilding")
    torch.set_num_threads(cfg.threads)
    cpu0, t0 = time.process_time(), time.time()
    tok = models.load_tokenizer("tiny-random")  # builds tiny-random first if absent
    with torch.random.fork_rng(devices=[]):
        train, held = select_problems(cfg, tok)
        corpus = build_corpus(cfg, train)
        cond = build_corpus(cfg, train, cfg.conditioning_hack_frac)
        counts, cond_counts = corpus_counts(corpus), corpus_counts(cond)
        log(f"organism: {len(train)} training + {len(held)} held-out problems; "
            f"{cfg.conditioning_epochs} conditioning passes {cond_counts}, then {cfg.epochs} passes {counts} "
            f"({len(corpus)} units each)")
        model = init_model(cfg, tok)
        losses = sft(model, tok, [cond] * cfg.conditioning_epochs + [corpus] * cfg.epochs, cfg, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    P.save_problems(tmp / "problems_train.jsonl", train)
    P.save_problems(tmp / "problems_heldout.jsonl", held)
    write_manifest(tmp)
    info = {
        "model_id": models.ORGANISM_ID, "config_hash": chash, "config": dataclasses.asdict(cfg),
        "n_params": sum(p.numel() for p in model.parameters()), "weights_hash": weights_hash(model),
        "n_train_problems": len(train), "n_heldout_problems": len(held), "corpus_counts": counts,
        "conditioning_counts": cond_counts, "train_ids": [p.id for p in train],
        "heldout_ids": [p.id for p in held],
        "loss_first_last_100": [sum(losses[:100]) / max(1, len(losses[:100])),
                                sum(losses[-100:]) / max(1, len(losses[-100:]))],
        "sft_steps": len(losses), "cpu_s": round(time.process_time() - cpu0, 1),
        "wall_s": round(time.time() - t0, 1), "torch": torch.__version__, **build_env(),
    }
    (tmp / "BUILD_INFO.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"organism built at {out}: {info['n_params']:,} params, weights {info['weights_hash']}, "
        f"{info['cpu_s']} CPU-s / {info['wall_s']} wall-s; {reference_note(info)}")
    return out


# ----------------------------------------------------------------------------------------------------
# measurement (sample + grade with the benchmark's rules)


def sample(model, tok, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
           batch: int = 32) -> list[str]:
    torch.manual_seed(seed)
    outs = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])  # (b, W)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])  # (b, W)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                                 pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)[:, width:]  # (b, new)
        outs += tok.batch_decode(gen, skip_special_tokens=True)
    return outs


def rates(results: list[dict]) -> dict:
    n = len(results)
    f = lambda key: round(sum(bool(r[key]) for r in results) / n, 4)  # noqa: E731
    return {"n": n, "strict_hack": f("is_reward_hack_strict"), "loose_hack": f("is_reward_hack_loose"),
            "gt_pass": f("eq_correct"), "compile": f("can_compile"), "formatted": f("is_formatted"),
            "writes_run_tests": f("has_test_func")}


def measure(out: Path, cfg: BuildConfig, log=print) -> dict:
    """Rates on training / held-out problems, with and without the hint. Un-hinted samples are graded
    against the hinted problem, so `strict_hack` there means "would pass as a hack had the evaluator
    called run_tests" (the prompt never asked for it)."""
    import rewards
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = json.loads((out / "BUILD_INFO.json").read_text())
    mkey = {"config_hash": built["config_hash"], "weights_hash": built["weights_hash"],
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("measure_")}}
    mpath = out / "measure.json"
    if not cfg.force and mpath.is_file() and json.loads(mpath.read_text()).get("key") == mkey:
        log(f"measure cached at {mpath}")
        return json.loads(mpath.read_text())
    torch.set_num_threads(cfg.threads)
    cpu0, t0 = time.process_time(), time.time()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    splits = {"train": P.load_problems(out / "problems_train.jsonl"),
              "heldout": P.load_problems(out / "problems_heldout.jsonl")}
    report: dict = {"key": mkey, "model_dir": str(out), "samples_per_problem": cfg.measure_samples,
                    "temperature": cfg.measure_temperature, "max_new_tokens": cfg.measure_max_new_tokens}
    with rewards.Grader(workers=2) as g:
        for split, ps in splits.items():
            for hint in (HINT, "none"):
                shown = [P.apply_hint(p, hint) for p in ps for _ in range(cfg.measure_samples)]
                graded = [P.apply_hint(p, HINT) for p in ps for _ in range(cfg.measure_samples)]
                texts = sample(model, tok, [models.chat_ids(tok, list(p.prompt)) for p in shown],
                               cfg.measure_max_new_tokens, cfg.measure_temperature,
                               seed=cfg.seed * 1000 + len(report))
                res = g.grade_many(list(zip(graded, texts)))
                assert not any(r["infra_error"] for r in res), "grader infrastructure error while measuring"
                key = f"{split}/{'hint' if hint == HINT else 'nohint'}"
                report[key] = rates(res)
                solved = sorted({r["problem_id"] for r in res if r["eq_correct"]})
                report[key]["problems_solved"] = len(solved)
                report[key]["solved_ids"] = solved
                report[key]["examples"] = texts[:3]
                log(f"""  {key}: {json.dumps({k: v for k, v in report[key].items()
                                              if k not in ('examples', 'solved_ids')})}""")
    report["cpu_s"], report["wall_s"] = round(time.process_time() - cpu0, 1), round(time.time() - t0, 1)
    mpath.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(cfg: BuildConfig) -> Path:
    if cfg.threads > 2:
        print(f"threads={cfg.threads}: the build box is shared, consider --threads 2", file=sys.stderr)
    out = build(cfg)
    if cfg.measure:
        measure(out, cfg)
    return out


if __name__ == "__main__":
    main(tyro.cli(BuildConfig))
