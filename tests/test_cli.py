"""The command line: output formats and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from specrun.cli import main


def invoke(*args):
    """The CLI on the torch reference backend unless a test names another: these tests exercise
    the CLI on tiny random models (``--backend auto``'s own choice is tested in test_plugins.py)."""
    args = list(args)
    if args and args[0] in ("generate", "bench") and not any(str(a) in ("--backend", "-b") or str(a).startswith("--backend=")
                                                            for a in args):
        args = [args[0], "--backend", "torch_cuda", *args[1:]]
    return CliRunner().invoke(main, args)


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("specrun: error:")
    assert fragment in err, err


def test_generate_json_on_tiny_model(tiny_models):
    r = invoke("generate", "Hello there", "--target", str(tiny_models["llama"]), "-n", "12", "--json", "--drafter", "ngram")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert set(obj) == {"text", "token_ids", "stats"}
    st = obj["stats"]
    for key in ("target_calls", "drafted", "accepted", "acceptance_length", "tokens_per_second", "backend", "device", "precision"):
        assert key in st
    assert st["backend"] == "torch_cuda" and st["device"] == "cpu" and st["precision"] == "f32"
    assert 1 <= len(obj["token_ids"]) <= 12
    assert st["acceptance_length"] >= 1.0


def test_generate_streams_text_then_summary(tiny_models):
    r = invoke("generate", "Hello", "--target", str(tiny_models["qwen2"]), "-n", "8", "--drafter", "none")
    assert r.exit_code == 0, r.output
    assert "acceptance length 1.00 tokens/call" in r.stderr
    assert "torch_cuda/cpu/f32 drafter=none" in r.stderr


def test_seeded_sampling_via_cli_is_reproducible(tiny_models):
    args = ("generate", "Hi", "--target", str(tiny_models["llama"]), "-n", "10", "--json", "-t", "0.9", "--top-p", "0.9", "--seed", "4")
    a, b = invoke(*args), invoke(*args)
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_stop_string_cuts_text(tiny_models):
    base = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "-n", "20", "--json", "--raw")
    text = json.loads(base.stdout)["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if not stop.strip():
        pytest.skip("degenerate random text")
    r = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "-n", "20", "--json", "--raw", "--stop", stop)
    obj = json.loads(r.stdout)
    assert obj["text"] == text[: text.find(stop)]
    assert obj["stats"]["stop_reason"] == "stop_string"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--backend", "nope"], "unknown backend 'nope'; known backends:"),
        (["--device", "cuda"], "device 'cuda' is not present for backend 'torch_cuda'; present: cpu"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["-k", "0"], "--num-draft-tokens must be >= 1"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--top-p", "0"], "top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["-n", "600"], "exceeds the model's context limit of 512"),
        (["--drafter", "model"], "needs --draft PATH"),
        (["--precision", "int3"], "cannot run precision 'int3'"),
        (["-t", "1e-320"], "too small to sample with"),
        (["-t", "inf"], "temperature must be a finite number"),
        (["-t", "nan"], "temperature must be a finite number"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--stop", "x", "--stop", ""], "a stop string is empty"),
        (["--threads", "-1"], "--threads must be >= 1, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line(args, fragment, tiny_models):
    r = invoke("generate", "Hello", "--target", str(tiny_models["llama"]), *args)
    assert_one_line_error(r, fragment)


def test_empty_prompt(tiny_models):
    assert_one_line_error(invoke("generate", "   ", "--target", str(tiny_models["llama"])), "prompt is empty")


def test_empty_stop_string_is_refused_by_the_pipeline(tiny_models):
    """The library boundary too: an empty stop string used to make streaming drop characters."""
    from specrun.errors import SpecrunError
    from specrun.pipeline import Pipeline

    pipe = Pipeline.load(str(tiny_models["llama"]), drafter="none")
    with pytest.raises(SpecrunError, match="a stop string is empty"):
        pipe.generate("Hi", max_new_tokens=4, stop=("",))


def test_prompt_that_is_not_utf8_is_one_line(tiny_models):
    """Bytes that are not UTF-8 reach Python as surrogate escapes (argv, files read with
    surrogateescape) and used to crash the tokenizer."""
    from specrun.errors import SpecrunError
    from specrun.pipeline import Pipeline

    r = invoke("generate", "caf\udce9", "--target", str(tiny_models["llama"]), "-n", "2")
    assert_one_line_error(r, "the prompt is not valid UTF-8 text (byte 0xe9 at character 3)")
    pipe = Pipeline.load(str(tiny_models["llama"]), drafter="none")
    with pytest.raises(SpecrunError, match="not valid UTF-8"):
        pipe.encode("x\udcff")


@pytest.mark.parametrize("template,kind", [
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),  # does not parse
    ("{{ raise_exception('only system prompts') }}", "TemplateError"),  # the template's own refusal
    ("{{ messages.__class__.__mro__ }}", "SecurityError"),  # trips the sandbox
    ("{{ messages[0].content + 1 }}", "TypeError"),  # raises while rendering
])
def test_chat_template_that_fails_is_one_line_naming_the_model(tmp_path, tiny_models, template, kind):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    (model / "chat_template.jinja").write_text(template)
    r = invoke("generate", "Hi", "--target", str(model), "-n", "2", "--drafter", "none")
    assert_one_line_error(r, f"the chat template of {model} cannot be rendered")
    assert kind in r.stderr and "--raw" in r.stderr
    assert invoke("generate", "Hi", "--target", str(model), "-n", "2", "--drafter", "none", "--raw").exit_code == 0


def test_draft_with_the_same_vocabulary_size_but_another_tokenizer(tmp_path, tiny_models, tiny_draft):
    """Same size is not the same tokenizer: two token ids swapped is refused, naming the difference."""
    import shutil

    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_draft, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = next(t for t, i in vocab.items() if i == 1000), next(t for t, i in vocab.items() if i == 1001)
    vocab[a], vocab[b] = 1001, 1000
    (other / "tokenizer.json").write_text(json.dumps(tj))
    r = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "--drafter", "model", "--draft", str(other), "-n", "2")
    assert_one_line_error(r, f"the draft model {other} has another tokenizer than the target")
    assert "token id 1000" in r.stderr
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    r = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "--drafter", "model", "--draft", str(other), "-n", "2")
    assert_one_line_error(r, "has no tokenizer to compare with the target's")


def test_missing_model_path(tmp_path):
    assert_one_line_error(invoke("generate", "Hi", "--target", str(tmp_path / "nowhere")), "not found: give a local transformers model folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("generate", "Hi", "--target", str(tmp_path / "empty")), "has no config.json")


def test_draft_with_other_vocabulary(tmp_path, tiny_models):
    from .conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "llama", vocab_size=1000)
    r = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "--drafter", "model", "--draft", str(other))
    assert_one_line_error(r, "draft model's vocabulary (1000 tokens) differs from the target's (49152)")


def test_model_drafter_on_cli(tiny_models, tiny_draft):
    r = invoke("generate", "Hi", "--target", str(tiny_models["llama"]), "--drafter", "model", "--draft", str(tiny_draft), "-n", "10", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["drafted"] > 0


def test_backends_lists_torch():
    r = invoke("backends", "--json")
    rows = {b["name"]: b for b in json.loads(r.stdout)["backends"]}
    assert rows["torch_cuda"]["available"] and "cpu" in rows["torch_cuda"]["devices"]
    assert rows["torch_cuda"]["precisions"]["cpu"][0] == "f32"


@pytest.mark.parametrize("exc", [
    OSError(28, "No space left on device", "/cache/onnx/m/model.onnx.data"),
    RuntimeError("Exception from src/inference/src/cpp/core.cpp:  [ GENERAL_ERROR ] write failed: No space left on device"),
])
def test_full_disk_is_one_line(monkeypatch, exc):
    import specrun.models

    def full(*_a, **_k):
        raise exc

    monkeypatch.setattr(specrun.models, "resolve_model", full)
    r = invoke("export", "--backend", "onnx_cpu")
    assert_one_line_error(r, "no space left on the disk")
    assert "specrun cache clear" in r.stderr


def test_other_crashes_are_not_called_a_full_disk(monkeypatch):
    import specrun.models

    def broken(*_a, **_k):
        raise ValueError("something else")

    monkeypatch.setattr(specrun.models, "resolve_model", broken)
    monkeypatch.delenv("SPECRUN_DEBUG", raising=False)
    r = invoke("export", "--backend", "onnx_cpu")
    assert r.exit_code == 1 and "no space" not in r.stderr
    assert "internal error: ValueError: something else" in r.stderr


@pytest.mark.parametrize("command", [["generate", "Hi"], ["bench", "--limit", "1"], ["conformance"], ["export"]])
def test_top_level_backend_is_every_commands_default(command):
    """`specrun --backend NAME COMMAND`: the design card's spelling reaches each command."""
    assert_one_line_error(invoke("--backend", "nope", *command), "unknown backend 'nope'")


def test_the_commands_own_backend_wins(tiny_models):
    r = invoke("--backend", "nope", "generate", "Hi", "--target", str(tiny_models["llama"]), "-n", "3",
               "--backend", "torch_cuda", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["backend"] == "torch_cuda"


def test_top_level_backend_before_a_command_without_one():
    r = invoke("--backend", "openvino", "cache")
    assert r.exit_code == 2 and "'cache' takes no --backend" in r.output


def test_bench_records_the_top_level_backend(monkeypatch):
    """The command written into bench reports reruns what ran."""
    import click

    import specrun_bench.run as bench

    seen = {}

    @click.command()
    @click.option("--backend")
    @click.option("--limit", type=int)
    @click.pass_context
    def fake(ctx, backend, limit):
        seen["line"] = bench._command_line(ctx)

    group = click.Group(commands={"bench": fake})
    click.testing.CliRunner().invoke(group, ["bench", "--limit", "5"], default_map={"bench": {"backend": "openvino"}})
    assert seen["line"] == "specrun bench --backend openvino --limit 5"


def test_usage_errors_that_quote_the_message_are_not_a_full_disk():
    import click

    from specrun.errors import disk_full

    assert disk_full(click.BadParameter("'No space left on device' is not a number")) is None
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise ValueError("unrelated") from None
    except ValueError as exc:
        assert disk_full(exc) is None  # `from None` hides the context


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    """A bug (not a SpecrunError) in any command: one line naming it and SPECRUN_DEBUG, exit 1;
    with SPECRUN_DEBUG=1 the exception propagates.  click's own exits (--help) are untouched."""
    import click

    from specrun.cli import SpecrunGroup

    @click.command("boom")
    def boom():
        raise KeyError("slot 7")

    group = SpecrunGroup(commands={"boom": boom})
    monkeypatch.delenv("SPECRUN_DEBUG", raising=False)
    r = CliRunner().invoke(group, ["boom"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error: KeyError" in lines[0] and "SPECRUN_DEBUG=1" in lines[0]
    assert "Traceback" not in r.output
    r = CliRunner().invoke(group, ["boom", "--help"])
    assert r.exit_code == 0 and "internal error" not in r.output
    monkeypatch.setenv("SPECRUN_DEBUG", "1")
    r = CliRunner().invoke(group, ["boom"])
    assert isinstance(r.exception, KeyError)


def test_operating_system_errors_are_one_line_naming_the_path(monkeypatch):
    import click

    from specrun.cli import SpecrunGroup

    @click.command("deny")
    def deny():
        raise PermissionError(13, "Permission denied", "/srv/out/report.md")

    monkeypatch.delenv("SPECRUN_DEBUG", raising=False)
    r = CliRunner().invoke(SpecrunGroup(commands={"deny": deny}), ["deny"])
    assert r.exit_code == 2
    assert r.stderr.strip() == ("specrun: error: Permission denied: /srv/out/report.md "
                                "(check the path and its permissions)")
