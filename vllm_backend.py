"""vLLM generation backend for train.py (`--backend vllm`, needs the `vllm` extra and a CUDA GPU).

    pip install -e '.[vllm]'
    python train.py full --backend vllm --arm erase --seed 0 --vhack-path out/vhack/qwen3-4b_mean.safetensors

Colocated on the training GPU: one vLLM engine holds its own copy of the base weights and its KV cache
(`--vllm-gpu-memory-utilization` of the card); the HF model keeps training delta_S. Before every
generation the adapted Linear weights are re-merged in the *current mode* (deploy mode for route arms
unless --no-generate-in-deploy-mode, the shrinkage control in evals, ...) and pushed with
`model.load_weights(weights=<iterator of (hf_name, W + dW)>)`, one merged tensor at a time (no full second
copy of the adapted weights). Only the wrapped weights change, so only they are sent. After each push the
engine's prefix cache is reset: vLLM does not invalidate cached KV blocks on load_weights, so without the
reset a prompt prefix seen before (the chat template, the same eval prompts in the next mode) would reuse
KV computed with the old weights.

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does), so the weight
push is a device copy, not a serialisation. Tensor parallelism is not supported (one GPU per run).

Sampling: one request per rollout, each with its own seed (request_seed(base seed, index), never reused by
another step's call), so a resumed run samples
the same completions. Returned ids end at, and include, the first EOS, exactly like grpo.generate. Each
sampled token comes with vLLM's log-prob of it under the distribution it was drawn from
(`logprobs_mode="processed_logprobs"`: after temperature and top-p; vllm >= 0.10.2), which the train pass
uses for the sampler correction (grpo.sampler_weights), as TRL's vLLM importance-sampling correction does.

Tested without vLLM against a stand-in engine (tests/test_vllm_backend.py) that checks the names, the
merge and the modes; on a machine with vLLM, the same test also runs against the real engine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Callable

import torch
from torch import nn

INSTALL_HINT = ("pip install -e '.[vllm]' (or `EXTRAS=dev,vllm bash scripts/setup.sh`) on a machine "
                "with a CUDA GPU")


def available() -> bool:
    """True when the vllm package can be imported (checked without importing it)."""
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:
        return False


def check_usable(device: str) -> None:
    """Raise a clear error, before anything is loaded, when --backend vllm cannot work here."""
    if not available():
        raise ValueError(f"backend='vllm' but the vllm package is not installed: {INSTALL_HINT}; "
                         "or pass --backend hf")
    if device != "cuda":
        raise ValueError(f"backend='vllm' needs a CUDA GPU (device resolved to {device!r}); "
                         "pass --backend hf on CPU")


@torch.no_grad()
def iter_mode_weights(model: nn.Module):
    """Yield ("<original linear name>.weight", W + dW) for every adapted Linear under the model's *current*
    mode (ablate_quarantine / reference / shrinkage contexts are honoured), in the base weight's dtype, one
    merged tensor at a time. The names are the unwrapped model's state_dict keys, which is what vLLM's
    load_weights expects (HF names; it maps q/k/v_proj and gate/up_proj into its fused
    qkv_proj / gate_up_proj)."""
    import antipasto

    for name, a in antipasto.get_adapters(model).items():
        yield f"{name}.weight", a.mode_weight()  # (d_out, d_in)


def mode_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<original linear name>.weight": W + dW}: iter_mode_weights collected into a dict."""
    return dict(iter_mode_weights(model))


def request_seed(seed: int, i: int) -> int:
    """Seed of request i of a generate call with base `seed`. Not seed + i: train.py's base seeds of
    consecutive steps differ by 1, so request i of step t+1 would replay the sampling noise of request i+1 of
    step t."""
    return (seed * 1_000_003 + i) % 2**63


class VllmEngine:
    """One colocated vLLM engine: `sync(model)` then `generate(...)` (same signature and result as
    grpo.generate). `llm_factory` exists for tests; by default it is vllm.LLM."""

    def __init__(self, model_path: str, dtype: str, seed: int, max_model_len: int,
                 gpu_memory_utilization: float, llm_factory: Callable | None = None):
        # in-process engine (set before vllm is imported): weight pushes are device copies and apply_model
        # needs no pickling (with multiprocessing, vllm 0.8 has no llm_engine.model_executor and later
        # versions need VLLM_ALLOW_INSECURE_SERIALIZATION=1 and would serialise every pushed tensor):
        # a shell value of 1 is overridden
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if llm_factory is None:
            if not available():
                raise ValueError(f"vllm is not installed: {INSTALL_HINT}")
            import vllm

            llm_factory = vllm.LLM
        assert 0.0 < gpu_memory_utilization < 1.0, (
            f"gpu_memory_utilization={gpu_memory_utilization}: need 0 < u < 1")
        # vLLM seeds the global random / numpy / torch generators with `seed` while starting up; restore them
        # so a run's own random state (data order, teacher-row sampling) is the same as with --backend hf
        import random

        import numpy as np

        rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            self.llm = llm_factory(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                   gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                                   tensor_parallel_size=1, logprobs_mode="processed_logprobs")
        except TypeError as e:
            if "logprobs_mode" not in str(e):
                raise
            raise ValueError(f"this vllm has no logprobs_mode ({e}): the sampler correction needs the "
                             "sampled tokens' processed log-probs, vllm >= 0.10.2; upgrade vllm or pass "
                             "--backend hf") from None
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.random.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        self.synced_key: tuple | None = None  # (mode flags, copies of every (dep, quar)) at the last push
        self.n_syncs = 0
        self.t_sync = 0.0

    def _apply(self, fn: Callable[[nn.Module], object]) -> list:
        assert hasattr(self.llm, "apply_model"), (
            "this vLLM has no LLM.apply_model: the weight push needs vllm >= 0.10.2 (pyproject.toml's extra)")
        return self.llm.apply_model(fn)

    def sync(self, model: nn.Module) -> None:
        """Push the adapted weights of the current mode into the engine, skipped only when the mode flags and
        the VALUES of every trainable tensor equal those of the last push. Values, not `_version` counters: a
        fused AdamW step or a `.data` write changes a tensor without bumping its version, and a stale engine
        would sample from an old policy without any error. The comparison copies are tiny
        (delta_S is (r,))."""
        import antipasto

        ads = antipasto.get_adapters(model)
        assert ads, "VllmEngine.sync: the model has no adapter (call antipasto.wrap_model first)"
        flags = tuple((n, a.use_dep, a.use_hack) for n, a in ads.items())
        if self.synced_key is not None and flags == self.synced_key[0] and all(
                torch.equal(a.dep.detach(), d) and torch.equal(a.quar.detach(), q)
                for a, (d, q) in zip(ads.values(), self.synced_key[1])):
            return
        t0 = time.time()
        n_sent = 0

        # merged lazily, one (d_out, d_in) tensor alive at a time; runs inside load (in-process)
        def weights():
            nonlocal n_sent
            for item in iter_mode_weights(model):
                n_sent += 1
                yield item

        def load(m: nn.Module) -> int:
            loaded = m.load_weights(weights=weights())
            # vLLM returns the set of loaded param names (q/k/v_proj count once, as qkv_proj);
            # a stand-in may return None
            return len(loaded) if loaded is not None else n_sent

        counts = self._apply(load)
        assert n_sent == len(ads) * len(counts), \
            f"VllmEngine.sync: sent {n_sent} tensors for {len(ads)} adapters and {len(counts)} workers"
        assert all(c > 0 for c in counts), (
            f"vLLM load_weights loaded nothing from {len(ads)} tensors: name mismatch?")
        # cached KV blocks were computed with the old weights and vLLM keeps them across load_weights: drop
        # them. Returns False while requests hold blocks (none do: generate() has returned);
        # older V1 engines return None.
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("VllmEngine.sync: vLLM refused to reset its prefix cache "
                               "(requests still running?)")
        self.synced_key = (flags, [(a.dep.detach().clone(), a.quar.detach().clone()) for a in ads.values()])
        self.n_syncs += 1
        self.t_sync += time.time() - t0

    def generate(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 batch: int, seed: int, eos_ids: list[int], on_batch=None) -> list:
        """One grpo.Completion per prompt: ids ending at and including the first EOS, truncated, and the
        sampler's processed log-prob of each token when sampling (None when greedy, or for a row whose stop
        token vLLM left out and this appends). Requests are sent in chunks of `batch` so
        `on_batch(start, outs)` can grade one chunk while the next decodes."""
        import vllm

        from grpo import Completion

        out: list[Completion] = []
        eos = set(eos_ids)
        sampled = temperature > 0
        for s in range(0, len(prompt_ids), batch):
            chunk = prompt_ids[s : s + batch]
            params = [vllm.SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature,
                                          top_p=top_p if sampled else 1.0,
                                          seed=request_seed(seed, s + i), logprobs=0 if sampled else None,
                                          stop_token_ids=list(eos_ids)) for i in range(len(chunk))]
            res = self.llm.generate([{"prompt_token_ids": p} for p in chunk], params, use_tqdm=False)
            assert len(res) == len(chunk), f"vLLM returned {len(res)} outputs for {len(chunk)} prompts"
            first = len(out)
            for r in res:
                o = r.outputs[0]
                ids = list(o.token_ids)
                lps = None
                if sampled:  # one {token id: Logprob} per generated token, the sampled one among them
                    assert o.logprobs is not None and len(o.logprobs) == len(ids), (
                        f"vLLM returned {None if o.logprobs is None else len(o.logprobs)} log-probs for "
                        f"{len(ids)} tokens")
                    lps = [float(d[t].logprob) for d, t in zip(o.logprobs, ids)]
                cut = next((i for i, t in enumerate(ids) if t in eos), None)
                if cut is not None:
                    out.append(Completion(ids[: cut + 1], False, lps[: cut + 1] if lps is not None else None))
                elif o.finish_reason == "stop":
                    # a stop token outside eos_ids (e.g. from generation_config), or left out
                    # vLLM (V1 check_stop) keeps the stop token in token_ids,
                    # so only append it when it is missing
                    stop = o.stop_reason if isinstance(o.stop_reason, int) else eos_ids[0]
                    kept = bool(ids) and ids[-1] == stop
                    out.append(Completion(ids if kept else ids + [stop], False, lps if kept else None))
                else:
                    out.append(Completion(ids, o.finish_reason == "length", lps))
            if on_batch is not None:
                on_batch(first, out[first:])
        return out
