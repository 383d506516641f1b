"""models.py: tiny-random build (offline, fast, deterministic), chat template, generation, errors; SmolLM2.

    .venv/bin/python -m pytest tests/test_models.py -q                 # SmolLM2 tests skip without the GGUF
    .venv/bin/python -m pytest tests/test_models.py -q -m smollm       # only the SmolLM2 ones
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import StoppingCriteria, StoppingCriteriaList

import models
import problems

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
GGUF = models.MODELS_DIR / "smollm2-135m" / models.SMOLLM_GGUF
needs_data = pytest.mark.skipif(
    not (problems.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz").is_file(),
    reason=f"LeetCode data not at {problems.DEFAULT_DATA_DIR} (set PGRPO_DATA_DIR); "
           "tiny-random trains its tokenizer on it",
)
needs_smollm = pytest.mark.skipif(not GGUF.is_file(),
                                  reason=f"SmolLM2 GGUF not at {GGUF}; run `just fetch-smollm`")


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny-random")


# ----------------------------------------------------------------------------------------- tiny-random


@needs_data
def test_tiny_build_is_fast_deterministic_and_leaves_rng_alone(tmp_path):
    rng_before = torch.get_rng_state()
    times = []
    for d in ("a", "b"):
        t0 = time.time()
        models.build_tiny_random(tmp_path / d)
        times.append(time.time() - t0)
    print(f"tiny-random build: {times[0]:.1f} s, {times[1]:.1f} s")
    assert max(times) < 30
    assert torch.equal(torch.get_rng_state(), rng_before)
    for f in ("tokenizer.json", "config.json", "chat_template.jinja", "BUILD_INFO.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    wa, wb = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["model.embed_tokens.weight"].std() > 0  # really random, not zeros


@needs_data
def test_tiny_architecture_and_tokenizer(tiny):
    model, tok = tiny
    c = model.config
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size) == (2, 64, 4, 2, 16, 128)
    assert c.vocab_size == len(tok) and 2000 <= len(tok) <= 4000
    assert [tok.convert_tokens_to_ids(t)
            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert models.model_id("tiny-random") == "tiny-random-v1"
    # byte-level: any text round-trips, and LeetCode text compresses (trained on it)
    s = "def f(x: List[int]) -> int:\n    return sum(x)  # ü → 世界\t\n"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    code = "class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
    assert len(tok(code, add_special_tokens=False)["input_ids"]) < len(code) / 2.5


@needs_data
def test_tiny_cached_load_is_fast(tiny):
    t0 = time.time()
    models.load_model("tiny-random")
    assert time.time() - t0 < 1.0


@needs_data
def test_chat_ids_matches_hand_rendered_chatml(tiny):
    _, tok = tiny
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "PROBLEM:\nadd a and b\n"}]
    want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPROBLEM:\nadd a and b\n<|im_end|>\n"
    ids = models.chat_ids(tok, msgs)
    assert tok.decode(ids) == want + "<|im_start|>assistant\n"
    # <|im_start|> first, one <|im_end|> per message, no BOS/EOS added
    assert ids[0] == 1 and ids.count(2) == 2
    assert tok.decode(models.chat_ids(tok, msgs, add_generation_prompt=False)) == want


@needs_data
def test_chat_ids_turns_qwen3_thinking_off(tiny):
    _, tok = tiny
    qwen_like = (  # the part of Qwen3's template that reads enable_thinking
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
    )
    saved = tok.chat_template
    try:
        tok.chat_template = qwen_like
        text = tok.decode(models.chat_ids(tok, [{"role": "user", "content": "hi"}]))
    finally:
        tok.chat_template = saved
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@needs_data
def test_tiny_generates_a_left_padded_batch(tiny):
    model, tok = tiny
    ps = problems.load_benchmark_test()[:2]
    rows = [models.chat_ids(tok, list(ps[0].prompt)),
            models.chat_ids(tok, [{"role": "user", "content": "hi"}])]
    batch = tok.pad({"input_ids": rows}, return_tensors="pt")  # (2, T) left-padded
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[1, 0] == tok.pad_token_id and mask[1, 0] == 0 and ids[1, -1] == rows[1][-1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                             do_sample=False)  # (2, T + <=6)
        assert out.shape[0] == 2 and 1 <= out.shape[1] - ids.shape[1] <= 6
        # left padding is masked out: the short row's next-token logits equal those of the row run alone
        batched = model(input_ids=ids, attention_mask=mask).logits[1, -1]  # (V,)
        alone = model(input_ids=torch.tensor([rows[1]])).logits[0, -1]  # (V,)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------- errors


def test_bad_dtype_and_missing_gguf(tmp_path):
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        models.load_model("tiny-random", dtype="fp8")
    with pytest.raises(FileNotFoundError) as e:
        models.smollm_dir(models_dir=tmp_path)
    assert "just fetch-smollm" in str(e.value) and "\n" not in str(e.value)


def test_model_id_forms(tmp_path):
    assert models.model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.model_id("qwen3-4b") == "Qwen/Qwen3-4B"
    assert models.model_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    assert models.model_id(str(tmp_path)) == str(tmp_path.resolve())


def test_unknown_model_offline_is_one_line_naming_aliases(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = (
        "import models\n"
        "for name in ('tiny-randon', 'nobody/no-such-model'):\n"
        "    try:\n        models.load_model(name)\n    except ValueError as e:\n"
        "        print('ERR', repr(str(e)))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    errs = [eval(line[4:]) for line in r.stdout.splitlines() if line.startswith("ERR ")]
    assert len(errs) == 2, r.stdout + r.stderr
    for name, msg in zip(("tiny-randon", "nobody/no-such-model"), errs):
        assert "\n" not in msg and repr(name) in msg and all(a in msg for a in models.ALIASES), msg


# ------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.smollm
@needs_smollm
def test_smollm_writes_a_fenced_python_block():
    torch.set_num_threads(2)
    model, tok = models.load_model("smollm2-135m")
    assert (models.MODELS_DIR / "smollm2-135m/hf/config.json").is_file()  # float copy cached for next time
    assert tok.padding_side == "left" and tok.pad_token is not None
    p = ([p for p in problems.load_leetcode() if p.id == 371][0]
         if (problems.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz").is_file() else None)
    msgs = list(p.prompt) if p else [
        {"role": "system", "content": problems.SYSTEM_PROMPT},
        {"role": "user", "content": "Write a Python function that adds two integers."}]
    ids = torch.tensor([models.chat_ids(tok, msgs)])  # (1, T)
    block = re.compile(r"```python\n.*?\bdef \w+\(.*?```", flags=re.DOTALL)

    class StopAfterBlock(StoppingCriteria):  # a closed fenced block is all we check; saves CPU
        def __call__(self, input_ids, scores, **kw):
            return block.search(tok.decode(input_ids[0, ids.shape[1] :],
                                           skip_special_tokens=True)) is not None

    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=200, do_sample=False,
            stopping_criteria=StoppingCriteriaList([StopAfterBlock()]),
        )  # (1, T + new)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"{out.shape[1] - ids.shape[1]} new tokens:\n{text}")
    assert block.search(text), text


@pytest.mark.smollm
@pytest.mark.slow
@needs_smollm
def test_smollm_float_copy_equals_dequantised_gguf():
    from transformers import AutoModelForCausalLM

    model, _ = models.load_model("smollm2-135m")
    g = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    a, b = model.state_dict(), g.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
