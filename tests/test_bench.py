"""specrun bench: datasets, a small end-to-end run on a tiny model (checking the report's content,
never its speed), the README section, Ctrl-C, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from specrun.cli import main
from specrun.errors import SpecrunError
from specrun_bench.prompts import load_prompts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    {"prompt": "Repeat after me: the cat sat on the mat. The cat sat on the mat.", "category": "copy"},
    {"turns": ["Write a haiku about the sea.", "Now another one."], "category": "writing"},
    {"text": "List three colors.", "id": "colors"},
]


def invoke(*args):
    """The CLI on the torch reference backend unless a test names another: these tests exercise
    the CLI on tiny random models (``--backend auto``'s own choice is tested in test_plugins.py)."""
    args = [str(a) for a in args]
    if args and args[0] in ("generate", "bench") and not any(str(a) in ("--backend", "-b") or str(a).startswith("--backend=")
                                                            for a in args):
        args = [args[0], "--backend", "torch_cuda", *args[1:]]
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("specrun: error:"), result.stderr
    assert fragment in err, err


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_models, tiny_draft):
    """One small bench: 3 prompts, 8 new tokens, plain + ngram + model drafter, transformers baseline."""
    root = tmp_path_factory.mktemp("bench")
    data = write_jsonl(root / "prompts.jsonl", PROMPTS)
    out = root / "out"
    r = invoke("bench", "--backend", "torch_cuda", "--drafter", "none,ngram,model", "--draft", tiny_draft,
               "--target", tiny_models["llama"], "--dataset", data, "--max-new-tokens", 8, "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    return r, out, json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- datasets


def test_mt_bench_has_80_first_turns_with_categories():
    prompts = load_prompts("mt-bench")
    assert len(prompts) == 80
    assert all(p.text.strip() and p.category for p in prompts)
    assert {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"} <= {
        p.category for p in prompts
    }
    assert len(load_prompts("mt-bench", 10)) == 10


def test_sharegpt_returns_limit_prompts():
    prompts = load_prompts("sharegpt", 7)
    assert len(prompts) == 7
    assert all(p.text.strip() for p in prompts)
    assert len({p.id for p in prompts}) == 7


def test_humaneval_chat_and_raw():
    chat = load_prompts("humaneval", 3)
    raw = load_prompts("humaneval", 3, humaneval_raw=True)
    assert len(load_prompts("humaneval")) == 164
    assert raw[0].raw and raw[0].text.startswith("from typing import List")
    assert not chat[0].raw and raw[0].text in chat[0].text


def test_jsonl_fields(tmp_path):
    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", PROMPTS)))
    assert [p.text for p in prompts] == [PROMPTS[0]["prompt"], "Write a haiku about the sea.", "List three colors."]
    assert prompts[0].category == "copy" and prompts[2].id == "colors" and prompts[1].id == "2"


@pytest.mark.parametrize(
    "lines,fragment",
    [
        (['{"prompt": "a"}', '{"prompt": "b"', '{"prompt": "c"}'], "line 2: not valid JSON"),
        (['{"prompt": "a"}', '{"prompt": "b"}', "", '{"prompt": "c"}'], "line 3: empty line"),
        (['{"prompt": "a"}', '["a list"]'], "line 2: expected a JSON object"),
        (['{"question": "a"}'], "line 1: no \"prompt\", \"turns\" or \"text\" field"),
        (['{"prompt": "a"}', '{"prompt": "   "}'], "line 2: the prompt must be a non-empty string"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, lines, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecrunError, match="bad.jsonl") as err:
        load_prompts(str(path))
    assert fragment in str(err.value)


def test_unknown_dataset():
    with pytest.raises(SpecrunError, match="unknown dataset 'mtbench'; choose one of: mt-bench, humaneval, sharegpt"):
        load_prompts("mtbench")
    with pytest.raises(SpecrunError, match="not found"):
        load_prompts("missing.jsonl")


# --------------------------------------------------------------------------- a small run


def test_bench_writes_three_outputs(bench_run):
    _, out, _ = bench_run
    for name in ("report.md", "results.json"):
        assert (out / name).stat().st_size > 0
    for name in ("acceptance_by_position.png", "tokens_per_second.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_results_hold_every_raw_measurement(bench_run):
    _, _, res = bench_run
    assert res["schema"] == "specrun-bench/1" and res["partial"] is False
    assert [s["name"] for s in res["systems"]] == ["torch_cuda", "transformers"]
    assert res["systems"][0]["configs"] == ["none", "ngram", "model"]
    assert res["systems"][0]["precision"] == "f32"
    assert res["systems"][1]["configs"] == ["generate", "prompt_lookup"]
    assert len(res["prompts"]) == 3 and res["prompts"][0]["prompt_tokens"] > 10
    runs = {(m["system"], m["config"], m["prompt"]) for m in res["measurements"]}
    assert len(res["measurements"]) == res["planned_runs"] == 3 * 5
    assert runs == {(s["name"], c, p) for s in res["systems"] for c in s["configs"] for p in range(3)}
    for m in res["measurements"]:
        assert 1 <= m["new_tokens"] <= 8 and len(m["token_ids"]) == m["new_tokens"]
        assert m["time_to_first_token"] > 0 and m["total_seconds"] > 0
        if m["config"] not in ("none", "generate"):
            assert "speedup_vs_plain" in m and m["identical_to_plain"] is not None
    for m in res["measurements"]:
        if m["system"] == "torch_cuda" and m["config"] != "none":
            assert len(m["drafted_per_position"]) == 4 and sum(m["tokens_per_call"]) == m["target_calls"]
    assert res["machine"]["logical_cpus"] >= 1 and res["machine"]["cpu"]
    assert res["versions"]["torch"] and res["versions"]["transformers"]
    assert res["settings"]["max_new_tokens"] == 8 and res["settings"]["num_draft_tokens"] == 4


def test_summary_has_speedup_and_greedy_identity(bench_run):
    _, _, res = bench_run
    summary = res["summary"]
    for drafter in ("ngram", "model"):
        sm = summary["torch_cuda"][drafter]
        assert sm["greedy_identical"] == {"identical": 3, "compared": 3}  # greedy speculation is lossless
        assert sm["all_identical"] is True
        assert sm["speedup_vs_plain"] is not None and sm["speedup_vs_plain"]["n"] >= 1
        assert sm["acceptance_length"]["mean"] >= 1.0
        assert len(sm["acceptance_rate_per_position"]) == 4
    plain = summary["torch_cuda"]["none"]
    assert plain["acceptance_length"]["mean"] == 1.0 and plain["speedup_vs_plain"] is None
    assert summary["transformers"]["prompt_lookup"]["greedy_identical"]["compared"] == 3
    assert summary["torch_cuda"]["none"]["tokens_per_second"]["median"] > 0


def test_markdown_report_tables(bench_run):
    r, out, res = bench_run
    md = (out / "report.md").read_text()
    assert md.startswith("# specrun bench:")
    assert f"`{res['command']}`" in md and "specrun bench --backend torch_cuda --drafter none,ngram,model" in md
    assert res["machine"]["cpu"] in md
    assert "## `torch_cuda` (cpu, f32)" in md
    assert "| drafter | acceptance length | acceptance rate by draft position | tokens/s |" in md
    assert "| none (plain) |" in md and "| ngram |" in md and "| model |" in md
    assert "| 3/3 |" in md  # greedy identical
    assert "## Outside baseline: transformers `generate`" in md
    assert "`generate(prompt_lookup_num_tokens=4)`" in md
    assert "![acceptance rate by draft position](acceptance_by_position.png)" in md
    assert "Acceptance length by category" in md  # the JSONL gave categories
    assert "| torch_cuda | ngram |" in md  # speed-up table
    assert "| ngram |" in r.stdout  # the tables are printed too


def test_readme_section_from_results(bench_run):
    _, out, res = bench_run
    r = invoke("bench", "--readme", out / "results.json")
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert text.startswith("## Performance")
    assert res["machine"]["cpu"] in text and res["command"] in text
    assert "| `torch_cuda` | f32 | ngram |" in text and "| transformers `generate` | f32 | none |" in text


def test_refuses_to_overwrite_without_force(bench_run, tiny_models):
    _, out, _ = bench_run
    before = (out / "results.json").read_text()
    r = invoke("bench", "--target", tiny_models["llama"], "--dataset", "mt-bench", "--out", out)
    assert_one_line_error(r, "results.json exists (and report.md, acceptance_by_position.png, tokens_per_second.png); "
                             "use --force to overwrite, or another --out")
    assert (out / "results.json").read_text() == before


def test_force_overwrites(tmp_path, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old")
    args = ["bench", "--target", tiny_models["llama"], "--dataset", "mt-bench", "--limit", 1, "-n", 4,
            "--no-baseline", "--warmup", 0, "--out", out]
    assert_one_line_error(invoke(*args), "report.md exists")
    r = invoke(*args, "--force")
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in res["systems"]] == ["torch_cuda"]
    assert res["prompts"][0]["category"] == "writing"
    assert (out / "report.md").read_text() != "old"


def test_ctrl_c_writes_a_partial_report(tmp_path, tiny_models, monkeypatch):
    import specrun_bench.run as bench

    real = bench.specrun_runner
    calls = {"n": 0}

    def interrupting_runner(*args, **kwargs):
        run = real(*args, **kwargs)

        def wrapped(ids, n):
            calls["n"] += 1
            if calls["n"] == 5:  # warm-up (2 runs) + 2 measured runs, then Ctrl-C
                raise KeyboardInterrupt
            return run(ids, n)

        return wrapped

    monkeypatch.setattr(bench, "specrun_runner", interrupting_runner)
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    r = invoke("bench", "--target", tiny_models["llama"], "--dataset", data, "-n", 6, "--no-baseline", "--out", out)
    assert r.exit_code == 130
    assert "partial report" in r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["partial"] is True and res["stopped_by"].startswith("interrupted")
    assert len(res["measurements"]) == 2 < res["planned_runs"]
    assert "**Partial run**" in (out / "report.md").read_text()
    assert (out / "tokens_per_second.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("tree", [None, "3,2,8"])
def test_eagle3_head_beside_ngram(tmp_path, tiny_models, tree):
    try:
        from .test_eagle3 import make_head
    except ImportError:  # pragma: no cover - the EAGLE-3 tests provide the random head
        pytest.skip("no EAGLE-3 head builder")
    head = make_head(tmp_path / "head")
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out"
    r = invoke("bench", "--target", tiny_models["llama"], "--drafter", "ngram,eagle3", "--draft", f"eagle3={head}",
               "-k", 3, "--dataset", data, "-n", 8, "--no-baseline", "--warmup", 0, "--out", out,
               *(["--tree", tree] if tree else ["--no-draft-gate"]))  # the random head drafts every call
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads((out / "results.json").read_text())
    assert res["systems"][0]["configs"] == ["none", "ngram", "eagle3"]
    assert res["settings"]["tree"] == ([3, 2, 8] if tree else None)
    assert res["settings"]["draft_gate"] is (None if tree else False)  # trees are never gated
    if not tree:
        assert "every call drafts: --no-draft-gate" in (out / "report.md").read_text()
    if tree:
        assert {m["stop_reason"] for m in res["measurements"]} <= {"length", "eos"}
        assert "dynamic tree, depth 3, top-2, 8 nodes" in (out / "report.md").read_text()
    eagle = res["summary"]["torch_cuda"]["eagle3"]
    assert eagle["greedy_identical"] == {"identical": 2, "compared": 2}
    assert sum(m["drafted"] for m in res["measurements"] if m["config"] == "eagle3") > 0
    assert res["settings"]["drafts"] == {"eagle3": str(head)}


def test_distinct_ngrams_measures_repetition():
    from specrun_bench.report import distinct_ngrams

    assert distinct_ngrams(list(range(20))) == 1.0
    assert distinct_ngrams([1, 2, 3] * 10) == pytest.approx(3 / 27)  # a loop: 3 distinct 4-grams of 27
    assert distinct_ngrams([1, 2, 3, 4]) is None  # one 4-gram says nothing


def test_draft_paths():
    from specrun_bench.run import draft_paths

    assert draft_paths(None, ["none", "ngram"]) == {}
    assert draft_paths("d", ["ngram", "model"]) == {"model": "d"}
    assert draft_paths("h", ["eagle3"]) == {"eagle3": "h"}
    assert draft_paths("model=d,eagle3=h", ["model", "eagle3"]) == {"model": "d", "eagle3": "h"}
    with pytest.raises(SpecrunError, match="each need one"):
        draft_paths("d", ["model", "eagle3"])
    with pytest.raises(SpecrunError, match="only used by the model and eagle3 drafters"):
        draft_paths("d", ["none", "ngram"])


def test_per_backend_values():
    from specrun_bench.run import per_backend

    assert per_backend(None, ["a", "b"], "precision", None) == {"a": None, "b": None}
    assert per_backend("f32", ["a", "b"], "precision", None) == {"a": "f32", "b": "f32"}
    assert per_backend("f32,b=bf16", ["a", "b"], "precision", None) == {"a": "f32", "b": "bf16"}
    with pytest.raises(SpecrunError, match="names backend 'c'"):
        per_backend("c=f32", ["a", "b"], "precision", None)


# --------------------------------------------------------------------------- bad input


def test_unknown_dataset_on_cli(tmp_path):
    assert_one_line_error(invoke("bench", "--dataset", "mtbench", "--out", tmp_path / "o"), "unknown dataset 'mtbench'")


def test_malformed_jsonl_on_cli(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    assert_one_line_error(invoke("bench", "--dataset", data, "--out", tmp_path / "o"), f"{data} line 2: not valid JSON")


def test_unknown_backend_on_cli(tmp_path):
    r = invoke("bench", "--backend", "torch_cuda,nope", "--dataset", "mt-bench", "--out", tmp_path / "o")
    assert_one_line_error(r, "unknown backend 'nope'")
    assert not (tmp_path / "o").exists()


def test_unavailable_backend_on_cli(tmp_path, monkeypatch):
    import specrun_bench.run as bench
    from specrun.interfaces import Availability, Backend
    from specrun.plugins import Registry

    from .conftest import register_backend_for_tests

    class Missing(Backend):
        name = "ghost"

        def availability(self):
            return Availability(False, "no ghost runtime installed", "pip install ghost-runtime")

        def devices(self):
            return []

        def precisions(self, device):
            return ["f32"]

        def load_target(self, model_dir, **kwargs):
            raise AssertionError("an unavailable backend must not be loaded")

    reg = Registry()
    register_backend_for_tests(reg, Missing())
    monkeypatch.setattr(bench, "load_registry", lambda: reg)
    r = invoke("bench", "--backend", "ghost", "--out", tmp_path / "o")
    assert_one_line_error(r, "backend 'ghost' is not available: no ghost runtime installed; pip install ghost-runtime")


def test_eagle3_is_a_clear_error(tmp_path, tiny_models):
    r = invoke("bench", "--target", tiny_models["llama"], "--drafter", "eagle3", "--limit", 1, "--no-baseline",
               "--out", tmp_path / "o")
    assert_one_line_error(r, "drafter 'eagle3' on backend 'torch_cuda'")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--drafter", "ngram,medusa"], "unknown drafter 'medusa'"),
        (["--drafter", "model"], "needs --draft PATH"),
        (["--drafter", "ngram", "--draft", "x"], "--draft is only used by the model and eagle3 drafters"),
        (["-k", 0], "--num-draft-tokens must be >= 1"),
        (["--backend", "transformers"], "is an outside baseline, not a backend; give it with --baseline"),
        (["--precision", "openvino=f32"], "--precision names backend 'openvino'"),
        (["--tree", "3,2"], "--tree takes DEPTH,TOPK,NODES"),
        (["--tree", "3,2,8"], "--tree applies to the eagle3 drafter"),
        (["--threads", -2], "--threads must be >= 1, got -2"),
    ],
)
def test_bad_options(tmp_path, args, fragment):
    assert_one_line_error(invoke("bench", *args, "--out", tmp_path / "o"), fragment)


@pytest.mark.parametrize("name", ["tokens_per_second.png", "acceptance_by_position.png", "report.md"])
def test_every_output_file_is_refused_without_force(tmp_path, name):
    """Any file bench writes, not only results.json: a user's own tokens_per_second.png was
    overwritten without --force."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's")
    assert_one_line_error(invoke("bench", "--dataset", "mt-bench", "--out", out), f"{out / name} exists; use --force")
    assert (out / name).read_bytes() == b"the user's"


def test_readme_needs_a_results_file(tmp_path):
    assert_one_line_error(invoke("bench", "--readme", tmp_path / "none.json"), "not found")
    (tmp_path / "x.json").write_text("{}")
    assert_one_line_error(invoke("bench", "--readme", tmp_path / "x.json"), "not a results.json")


# --------------------------------------------------------------------------- outside baselines


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeLlama:
    """llama-cpp-python's Llama as the bench uses it: create_completion on token ids (non-streaming),
    reset, tokenize.  Each evaluated token costs 10 ms of the fake clock (prefill 50 ms); a call
    without reset() in between reuses the cache, which the bench must never let happen."""

    clock: FakeClock
    loaded: list = []

    def __init__(self, model_path, **kw):
        self.model_path, self.kw, self.fresh, self.draft_model = model_path, kw, True, None
        FakeLlama.loaded.append(self)

    def reset(self):
        self.fresh = True

    def create_completion(self, prompt, max_tokens, stream=False, **kw):
        assert isinstance(prompt, list) and not stream
        assert self.fresh, "the prompt cache was not reset between calls"
        assert kw["temperature"] == 0.0 and kw["repeat_penalty"] == 1.0
        self.fresh = False
        self.clock.now += 0.05 + 0.01 * max_tokens
        words = [f"w{(sum(prompt) + i) % 7}" for i in range(max_tokens)]
        return {"choices": [{"text": " ".join(words), "finish_reason": "length"}]}

    def tokenize(self, data: bytes, add_bos=True, special=False):
        return [100 + int(w[1:]) for w in data.decode().split()]


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    import sys
    import types

    import specrun_bench.baselines as bl

    clock = FakeClock()
    mod = types.ModuleType("llama_cpp")
    mod.__version__ = "0.0-fake"
    spec = types.ModuleType("llama_cpp.llama_speculative")
    spec.LlamaPromptLookupDecoding = lambda num_pred_tokens: ("lookup", num_pred_tokens)
    FakeLlama.clock, FakeLlama.loaded = clock, []
    mod.Llama = FakeLlama
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", spec)
    monkeypatch.setattr(bl, "clock", clock)
    return clock


def test_llama_cpp_baseline_times_decode_as_t_n_minus_t_1_and_is_the_reference(fake_llama_cpp, tiny_models, tmp_path):
    import shutil

    target = tmp_path / "target"
    shutil.copytree(tiny_models["llama"], target)
    (target / "tiny.Q8_0.gguf").write_bytes(b"GGUF")
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "out"
    r = invoke("bench", "--target", target, "--dataset", data, "-n", 6, "--baseline", "llama.cpp", "--warmup", 0,
               "--out", out)
    assert r.exit_code == 0, (r.output, r.exception)
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["reference"] == "llama.cpp"
    plain, lookup = FakeLlama.loaded  # one instance each, as llama-cpp-python documents them
    assert plain.model_path == lookup.model_path == str(target / "tiny.Q8_0.gguf")
    assert "draft_model" not in plain.kw and lookup.kw["draft_model"] == ("lookup", 4) and lookup.kw["logits_all"]
    runs = [m for m in res["measurements"] if m["system"] == "llama.cpp"]
    assert {m["config"] for m in runs} == {"generate", "prompt_lookup"} and len(runs) == 4
    for m in runs:  # t(6) - t(1) = 5 tokens x 10 ms on the fake clock: 100 tokens/s, the prefill is not in it
        assert m["new_tokens"] == 6 and m["decode_tokens"] == 5
        assert m["tokens_per_second"] == pytest.approx(100.0)
        assert m["time_to_first_token"] == pytest.approx(0.06)
        assert m["precision"] == "Q8_0" and m["acceptance_length"] is None
    lookup = [m for m in runs if m["config"] == "prompt_lookup"]
    assert all(m["identical_to_plain"] for m in lookup)
    # every run has its speed against llama.cpp's plain run on the same prompt
    ref = {m["prompt"]: m["tokens_per_second"] for m in runs if m["config"] == "generate"}
    for m in res["measurements"]:
        assert m["speedup_vs_reference"] == pytest.approx(m["tokens_per_second"] / ref[m["prompt"]])
    md = (out / "report.md").read_text()
    assert "## Outside baseline: llama.cpp (llama-cpp-python 0.0-fake, tiny.Q8_0.gguf" in md
    assert "## Against llama.cpp plain decoding" in md
    assert "LlamaPromptLookupDecoding(num_pred_tokens=4)" in md
    # each configuration's repetitiveness beside its speed: the median share of distinct 4-grams
    from specrun_bench.report import distinct_ngrams

    for s in res["systems"]:
        for c in s["configs"]:
            answers = [m["token_ids"] for m in res["measurements"] if m["system"] == s["name"] and m["config"] == c]
            median = float(np.median([distinct_ngrams(t) for t in answers]))
            assert res["summary"][s["name"]][c]["distinct_4grams"]["median"] == pytest.approx(median)
    assert "| distinct 4-grams |" in md
    section = invoke("bench", "--readme", out / "results.json").output
    assert "vs llama.cpp plain |" in section and "| llama.cpp | Q8_0 | none |" in section


def test_missing_baselines_are_one_line_saying_how_to_install(monkeypatch, tiny_models, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "openvino_genai", None)
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = invoke("bench", "--target", tiny_models["llama"], "--dataset", data, "--baseline", "llama.cpp",
               "--out", tmp_path / "a")
    assert_one_line_error(r, "the llama.cpp baseline needs a GGUF of the target")  # the folder has none
    target = tmp_path / "target"
    import shutil

    shutil.copytree(tiny_models["llama"], target)
    (target / "m.gguf").write_bytes(b"GGUF")
    r = invoke("bench", "--target", target, "--dataset", data, "--baseline", "llama.cpp", "--out", tmp_path / "b")
    assert_one_line_error(r, "needs llama-cpp-python: pip install llama-cpp-python")
    r = invoke("bench", "--target", target, "--dataset", data, "--baseline", "transformers,llamacpp", "--out", tmp_path / "c")
    assert_one_line_error(r, "unknown baseline 'llamacpp'; choose from: transformers, llama.cpp, openvino-genai")
    r = invoke("bench", "--target", target, "--dataset", data, "--baseline", "openvino-genai",
               "--baseline-weights", "int3", "--out", tmp_path / "d")
    assert_one_line_error(r, "--baseline-weights takes one of fp32, int8, int4")
    assert not (tmp_path / "d").exists()
