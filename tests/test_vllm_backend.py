"""The vLLM backend (vllm_backend.py, train.py --backend vllm) without vLLM: a stand-in engine with vLLM's
interface (LLM(model=...), apply_model(fn) -> fn(model) with model.load_weights(list of (hf_name, tensor)),
generate(list of {"prompt_token_ids"}, list of SamplingParams)) that owns a *separate* copy of the base model
loaded from the same path. If the names, the merge or the mode handling were wrong, its completions would
differ from grpo.generate on the adapted model.
A last test runs the real engine where vLLM and a GPU exist."""

from __future__ import annotations

import random
import sys
import types
from dataclasses import dataclass, field, replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import antipasto
import models
import problems as P
import grpo
import contextlib
import train
import vllm_backend

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------------
# a stand-in for the vllm package
@dataclass
class FakeSamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: list = field(default_factory=list)


@dataclass
class _Logprob:
    logprob: float


class _Out:
    def __init__(self, token_ids, finish_reason, stop_reason, logprobs=None):
        self.token_ids, self.finish_reason, self.stop_reason = token_ids, finish_reason, stop_reason
        self.logprobs = logprobs  # vLLM: one {token id: Logprob} per generated token when requested


class _Req:
    def __init__(self, out):
        self.outputs = [out]


class _Model:
    """What apply_model hands to the function: the engine's model with vLLM's load_weights contract."""

    def __init__(self, hf):
        self.hf = hf
        self.calls = 0

    def load_weights(self, weights):
        sd = self.hf.state_dict()
        loaded = set()
        with torch.no_grad():
            for name, w in weights:
                if name not in sd:  # vLLM raises on a name it cannot map
                    raise KeyError(f"stand-in engine: no parameter {name!r}")
                assert sd[name].shape == w.shape, (name, sd[name].shape, w.shape)
                sd[name].copy_(w)
                loaded.add(name)
        self.calls += 1
        return loaded


class FakeLLM:
    instances: list = []

    def __init__(self, model: str, dtype: str, seed: int, max_model_len: int,
                 gpu_memory_utilization: float, **kw):
        self.kw = dict(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len, **kw)
        torch.manual_seed(seed)  # as vLLM does at start-up (set_random_seed)
        random.seed(seed)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=models.DTYPES[dtype]).eval()
        self.model = _Model(hf)
        self.prefix_cache_resets = 0
        FakeLLM.instances.append(self)

    def apply_model(self, fn):
        return [fn(self.model)]

    # vLLM keeps cached KV across load_weights; the engine must drop it after a push
    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        out = []
        for p, sp in zip(prompts, params):
            assert sp.top_p == 1.0, "stand-in engine implements temperature sampling only"
            g = torch.Generator().manual_seed(sp.seed)
            ids = list(p["prompt_token_ids"])
            gen, lps, finish, stop = [], [], "length", None
            for _ in range(sp.max_tokens):
                logits = self.model.hf(torch.tensor([ids])).logits[0, -1].float()  # (V,)
                if sp.temperature == 0:
                    t = int(logits.argmax())
                else:
                    t = int(torch.multinomial(torch.softmax(logits / sp.temperature, -1), 1, generator=g))
                # processed_logprobs: the log-prob under the distribution sampled from (temperature applied)
                lps.append({t: _Logprob(float(torch.log_softmax(logits / (sp.temperature or 1.0), -1)[t]))})
                ids.append(t)
                gen.append(t)
                if t in sp.stop_token_ids:  # vLLM keeps the stop token id in token_ids
                    finish, stop = "stop", t
                    break
            assert sp.logprobs is None or self.kw.get("logprobs_mode") == "processed_logprobs"
            out.append(_Req(_Out(gen, finish, stop, lps if sp.logprobs is not None else None)))
        return out


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances = []
    return mod


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapted():
    """tiny-random with the adapter wrapped and non-zero delta_S and delta_S_hack."""
    m, tok = models.load_model("tiny-random")
    ads = antipasto.wrap_model(m)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(0.3 * torch.randn(a.r, generator=g))
            a.delta_S_hack.copy_(0.3 * torch.randn(a.r, generator=g))
    return m, tok


def _prompts(tok) -> list[list[int]]:
    return [models.chat_ids(tok, [{"role": "user", "content": t}])
            for t in ("def add(a, b):", "class Solution:", "run_tests()")]


def test_mode_weights_agree_with_merge_and_base(adapted):
    """Deploy-mode weights equal antipasto.merge (a second implementation); reference mode is the base."""
    m, _ = adapted
    with antipasto.ablate_quarantine(m):
        w = vllm_backend.mode_weights(m)
    ref = antipasto.merge(m)
    assert w.keys() == ref.keys() and len(w) == len(antipasto.get_adapters(m))
    for k in w:
        torch.testing.assert_close(w[k], ref[k], rtol=0, atol=0)
    base = models.load_model("tiny-random")[0].state_dict()
    with antipasto.reference(m):
        w0 = vllm_backend.mode_weights(m)
    for k in w0:
        assert k in base, f"{k} is not a key of the unwrapped model"
        assert torch.equal(w0[k], base[k])
    with torch.no_grad():  # and the quarantine moves the weights when it is on
        assert max((vllm_backend.mode_weights(m)[k] - ref[k]).abs().max().item() for k in ref) > 0


@pytest.mark.parametrize("mode", ["deploy", "quarantine_on", "reference"])
def test_engine_generates_what_the_adapted_model_generates(adapted, fake_vllm, mode):
    """After sync, the engine's greedy completions equal grpo.generate on the adapted model in the same
    mode."""
    m, tok = adapted
    ctx = {"deploy": antipasto.ablate_quarantine, "quarantine_on": contextlib.nullcontext,
           "reference": antipasto.reference}[mode]
    eng = vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    prompts = _prompts(tok)
    eos = grpo.eos_ids(tok)
    with ctx(m):
        want = grpo.generate(m, tok, prompts, 12, 0.0, 1.0, 8, seed=0)
        stale = eng.generate(prompts, 12, 0.0, 1.0, 2, 0, eos)  # engine still holds the base weights
        eng.sync(m)
        got = eng.generate(prompts, 12, 0.0, 1.0, 2, 0, eos)
    assert got == want
    if mode != "reference":  # the test can fail: without the sync the engine samples the base model
        assert stale != want


def test_sync_pushes_only_on_change(adapted, fake_vllm):
    m, _ = adapted
    eng = vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    llm = FakeLLM.instances[-1]
    fake = llm.model
    with antipasto.ablate_quarantine(m):
        eng.sync(m)
        eng.sync(m)
    assert fake.calls == 1
    eng.sync(m)  # quarantine back on: a new push
    assert fake.calls == 2
    ad = next(iter(antipasto.get_adapters(m).values()))
    with torch.no_grad():
        ad.delta_S.add_(0.0)  # a version bump with the same values: nothing to push
    eng.sync(m)
    assert fake.calls == 2
    with torch.no_grad():
        # a value change WITHOUT a version bump (a fused AdamW step, a .data write)
        ad.delta_S.data.add_(0.01)
    try:
        eng.sync(m)
        assert fake.calls == 3, "changed values must be pushed even when _version did not move"
    finally:
        with torch.no_grad():
            ad.delta_S.data.sub_(0.01)  # the module-scoped model is shared with other tests
    assert llm.prefix_cache_resets == fake.calls  # every push (and only a push) drops the stale prefix cache


def test_engine_start_leaves_the_global_rng_alone(fake_vllm):
    torch.manual_seed(123)
    random.seed(123)
    want_t, want_r = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    # the stand-in reseeds with 0
    vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    assert torch.equal(torch.rand(3), want_t) and random.random() == want_r


def test_eos_handling(adapted, fake_vllm):
    """ids end at and include the first EOS; a stop that vLLM left out of token_ids gets it appended."""
    m, tok = adapted
    eng = vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    eos = grpo.eos_ids(tok)

    def lp(*ids):
        return [{t: _Logprob(-0.25 * (k + 1))} for k, t in enumerate(ids)]

    def fake_generate(prompts, params, use_tqdm=True):
        assert all(p.logprobs == 0 for p in params), "sampling asks for the sampled tokens' log-probs"
        return [_Req(_Out([5, 6, eos[0], 7], "stop", eos[0], lp(5, 6, eos[0], 7))),
                _Req(_Out([5, 6], "stop", None, lp(5, 6))),
                _Req(_Out([5, 6, 7], "length", None, lp(5, 6, 7)))]

    eng.llm.generate = fake_generate
    out = eng.generate([[1], [1], [1]], 4, 1.0, 1.0, 8, 0, eos)
    # the appended stop token has no log-prob from vLLM: that row gets none (weight 1 in the loss)
    assert out == [([5, 6, eos[0]], False, [-0.25, -0.5, -0.75]), ([5, 6, eos[0]], False, None),
                   ([5, 6, 7], True, [-0.25, -0.5, -0.75])]


def test_train_main_runs_with_vllm_backend(tmp_path, fake_vllm, monkeypatch, pool_dir, vhack_file):
    """A 2-step route run with --backend vllm: the engine is synced before every generation (train steps in
    deploy mode, the final eval in deploy / quarantine-on / shrinkage mode) and the log is complete."""
    monkeypatch.setattr(vllm_backend, "check_usable", lambda device: None)  # the stand-in runs on CPU
    cfg = replace(train.PRESETS["smoke"][1], backend="vllm", arm="route", steps=2, out_dir=str(tmp_path),
                  run_name="v", teacher_pool_dir=str(pool_dir), vhack_path=str(vhack_file), eval_problems=1,
                  max_new_tokens=16)
    run = train.main(cfg)
    rows = (run / "log.tsv").read_text().strip().splitlines()
    assert len(rows) == 3
    fake = FakeLLM.instances[-1]
    # context = the longest train or eval prompt + the completion budget
    tok = models.load_tokenizer("tiny-random")
    longest = max(len(models.chat_ids(tok, list(p.prompt))) for p in
                  [*P.load_train_split(cfg.train_source, cfg.data_path, cfg.difficulties, cfg.max_problems,
                                       cfg.hint, cfg.max_prompt_tokens, models.prompt_len(tok))[0],
                   *[P.apply_hint(q, cfg.eval_hint) for q in P.load_benchmark_test()[: cfg.eval_problems]]])
    assert fake.kw["max_model_len"] == longest + cfg.max_new_tokens
    # 2 train generations (deploy; delta_S changes between them) + evals in 3 modes = 5 pushes at least
    assert fake.model.calls >= 5, fake.model.calls
    assert (run / "eval.json").exists()


def test_backend_vllm_without_vllm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_backend, "available", lambda: False)
    cfg = replace(train.PRESETS["smoke"][1], backend="vllm", steps=1, out_dir=str(tmp_path), run_name="x",
                  teacher_pool_dir="", mix_ratio=0.0)
    with pytest.raises(ValueError, match=r"vllm package is not installed.*--backend hf"):
        train.main(cfg)
    assert not (tmp_path / "x").exists()


def test_backend_vllm_on_cpu_is_a_clear_error(tmp_path, fake_vllm):
    cfg = replace(train.PRESETS["smoke"][1], backend="vllm", device="cpu", steps=1, out_dir=str(tmp_path),
                  run_name="x", teacher_pool_dir="", mix_ratio=0.0)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train.main(cfg)


@pytest.mark.skipif(not (vllm_backend.available() and "vllm" not in sys.modules
                         and torch.cuda.is_available()),
                    reason="needs the vllm package and a CUDA GPU (EXTRAS=dev,vllm bash scripts/setup.sh)")
def test_real_vllm_engine_follows_the_adapter():
    """SmolLM2 in bf16 (tiny-random's fp32 / head_dim 16 are not vLLM attention-backend shapes): after a
    sync with a large delta_S, the engine's greedy prefixes match HF's on the adapted model,
    not the base's."""
    m, tok = models.load_model("smollm2-135m", dtype="bfloat16", device="cuda")
    ads = antipasto.wrap_model(m)
    with torch.no_grad():
        for a in ads.values():
            a.delta_S.copy_(0.5 * a.S.float())  # scale every singular value by 1.5: a visibly different model
    prompts = _prompts(tok)
    eos = grpo.eos_ids(tok)
    eng = vllm_backend.VllmEngine(models.resolve_path("smollm2-135m"), "bfloat16", 0, 1024, 0.2)
    with antipasto.ablate_quarantine(m):
        want = grpo.generate(m, tok, prompts, 8, 0.0, 1.0, 8, seed=0)
        eng.sync(m)
        got = eng.generate(prompts, 8, 0.0, 1.0, 8, 0, eos)
    with antipasto.reference(m):
        base = grpo.generate(m, tok, prompts, 8, 0.0, 1.0, 8, seed=0)
    same = sum(g[0][:4] == w[0][:4] for g, w in zip(got, want))
    assert same >= 2, (got, want)  # bf16 kernels differ, so allow one greedy divergence
    assert want != base


def test_request_seeds_are_not_shared_between_consecutive_steps(adapted, fake_vllm):
    """train.py's base seed is cfg.seed * 1_000_003 + step: consecutive steps' requests must not reuse each
    other's seeds (seed + index would give request i of step t+1 the sampling noise of request i+1
    of step t)."""
    m, tok = adapted
    eng = vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    seen = []

    def fake_generate(prompts, params, use_tqdm=True):
        seen.append([p.seed for p in params])
        return [_Req(_Out([5], "length", None, [{5: _Logprob(-1.0)}])) for _ in prompts]

    eng.llm.generate = fake_generate
    for step in (7, 8):
        eng.generate([[1]] * 6, 1, 1.0, 1.0, 4, 3 * 1_000_003 + step, grpo.eos_ids(tok))
    a, b = sum(seen[:2], []), sum(seen[2:], [])
    assert len(set(a)) == len(a) == 6 and len(set(b)) == 6  # distinct within a call, across its chunks
    assert not set(a) & set(b)


def test_sampled_log_probs_belong_to_their_tokens(adapted, fake_vllm):
    """Sampling at T = 0.8 through the engine: each returned log-prob is the (processed) log-prob of the token
    beside it, i.e. the train pass's token_logprobs at 0.8 on the adapted model for the same sequence (an
    off-by-one between ids and log-probs would break this)."""
    m, tok = adapted
    eng = vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3)
    assert FakeLLM.instances[-1].kw["logprobs_mode"] == "processed_logprobs"
    prompts = _prompts(tok)
    with antipasto.ablate_quarantine(m):
        eng.sync(m)
        outs = eng.generate(prompts, 8, 0.8, 1.0, 4, 5, grpo.eos_ids(tok))
        rs = [grpo.Rollout(0, p, o.ids, "", "student", o.truncated) for p, o in zip(prompts, outs)]
        ids, att, cm = grpo.pack(rs, 0, "cpu")
        with torch.no_grad():
            lp = grpo.token_logprobs(m, ids, att, where=cm, temperature=0.8)  # (B, T)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert o.logp is not None and len(o.logp) == len(o.ids) > 1
        torch.testing.assert_close(torch.tensor(o.logp), lp[i, len(p) : len(p) + len(o.ids)],
                                   rtol=1e-4, atol=1e-4)


def test_a_vllm_without_processed_log_probs_is_a_clear_error(fake_vllm):
    def old_llm(model, dtype, seed, max_model_len, gpu_memory_utilization, enable_prefix_caching,
                tensor_parallel_size):
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match="logprobs_mode.*vllm >= 0.10.2"):
        vllm_backend.VllmEngine(models.resolve_path("tiny-random"), "float32", 0, 256, 0.3,
                                llm_factory=old_llm)
