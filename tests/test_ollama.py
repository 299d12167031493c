"""Ollama and LM Studio take an exported GGUF as it is: the metadata they read (chat template, bos /
eos / end-of-turn ids, add_bos, name) and the Ollama ``Modelfile`` written beside it.

Ollama's Go templates cannot run here (no Go, no Ollama): ``gotemplate.py`` executes the subset of
Go's text/template the Modelfiles use, strictly, and ``ollama_side.py`` merges messages and parses
a Modelfile as Ollama does. The TEMPLATE mlxqat writes must render every conversation exactly as
the model's own (Hugging Face) chat template does: SmolLM2's from its GGUF, Gemma 3's format (the
Gemma 3 270M GGUF in .models/ is the base model, without a chat template, so its tokenizer gets the
format's template here), and tiny models' always. llama.cpp (xllamacpp), where installed, is a second, independent reference.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import gguf
import pytest

import mlxqat
import tiny
from gotemplate import Unsupported, execute
from ollama_side import collate, ollama_prompt, parse_modelfile
from real_models import GEMMA3, SMOLLM2, needs
from test_gguf_tokenizer import CONTROL, GEMMA, spm_tokenizer
from mlxqat import export as ex
from mlxqat.gguf import ollama
from mlxqat.gguf.format import Metadata, read_gguf
from mlxqat.gguf.tokenizer import end_of_turn, gguf_tokenizer
from mlxqat.storage.manifest import is_mlxqat_output

# Gemma 3's chat format (the instruction-tuned models' tokenizer_config.json), written out for these
# tests: bos, a leading system message before the first user message and a blank line, roles that
# must alternate, the assistant as "model", message text stripped.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n'"
    " + (prefix if loop.first else '') + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# ChatML with a default system message (as SmolLM2's), one that Go templates must quote.
ODD_SYSTEM = 'You are "Tiny" {{ .Content }} """ naïve\tbot\u00a0✓'
CHATML_TEMPLATE = (
    "{%- set default_system = " + json.dumps(ODD_SYSTEM, ensure_ascii=False) + " -%}"
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Not a format mlxqat writes: Alpaca-like turns that end with <|endoftext|>.
OTHER_TEMPLATE = (
    "{%- for m in messages -%}{{ '### ' + m['role'] + ':\\n' + m['content'] + '<|endoftext|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### assistant:\\n' }}{%- endif -%}"
)

# Looks like ChatML, but a blank line after each turn: the check must refuse it.
NEAR_CHATML = CHATML_TEMPLATE.replace("<|im_end|>\\n' }}{%- endfor", "<|im_end|>\\n\\n' }}{%- endfor")

WORDS = ["Hello", "world", "{{ .Role }}", '"quoted"', "naïve", "✓", "日本語", "a\nb", "x  y", "$last", "<b>", "42"]


def conversations(n, seed=0, system_first=None):
    """``n`` random conversations: an optional leading system message, then alternating user /
    assistant turns ending with either (message text without surrounding spaces, which Gemma strips)."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": text()}] if (rng.random() < 0.5 if system_first is None
                                                           else system_first) else []
        for t in range(rng.randint(1, 6)):
            conv.append({"role": "user" if t % 2 == 0 else "assistant", "content": text()})
        out.append(conv)
    return out


CONVERSATIONS = [list(p) for p in ollama.PROBES] + conversations(40)


def hf_prompt(tokenizer, conv):
    """The Hugging Face chat template's prompt: generation prompt added, or a last reply continued."""
    if conv[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def gguf_tokenizer_of(path):
    path = Path(path)
    meta = Metadata(read_gguf(path), path)
    return gguf_tokenizer(meta, len(meta.strings("tokenizer.ggml.tokens")))[0]


def llamacpp(path, **kw):
    pytest.importorskip("xllamacpp")
    from mlxqat.gguf.llamacpp import LlamaCpp

    return LlamaCpp(path, n_ctx=512, **kw)


# ---------------------------------------------------------------------------
# The Go templates, by themselves
# ---------------------------------------------------------------------------

FORMATS = {"chatml": ollama.chatml(None), "chatml-default": ollama.chatml(ODD_SYSTEM),
           "gemma": ollama.gemma("\n\n"), "gemma-odd-separator": ollama.gemma('\n"{{x}}"\t')}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_go_template_renders_what_its_format_says(name):
    fmt = FORMATS[name]
    for conv in CONVERSATIONS + conversations(60, seed=1):
        assert ollama_prompt(fmt.template, conv) == fmt.render(conv), conv


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_modelfile_reads_back_in_ollamas_parser(tmp_path, name):
    fmt = FORMATS[name]
    text = ollama.modelfile_text(tmp_path / "my model-q4_0.gguf", fmt, "checked", name="My Model")
    assert text.startswith(ollama.MARK)
    commands = parse_modelfile(text)
    assert commands == [("model", "./my model-q4_0.gguf"), ("template", fmt.template)] + [
        ("stop", s) for s in fmt.stops]
    assert "# ollama create my-model -f 'my model-q4_0.Modelfile'" in text
    assert all(c.isprintable() for line in text.splitlines() for c in line)


def test_the_interpreter_is_go_and_strict():
    data = {"Messages": [], "X": "a b", "N": 3, "E": ""}
    assert execute("a  {{- .X -}}  b", data) == "aa bb"
    assert execute("{{ or .E .N }}|{{ and .N .E }}|{{ not .E }}|{{ len .X }}|{{ len \"é\" }}", data) == "3||true|3|2"
    assert execute('{{ $v := "x" }}{{ if .N }}{{ $v = "y" }}{{ $w := 1 }}{{ end }}{{ $v }}', data) == "y"
    with pytest.raises(Unsupported, match="undefined variable"):  # declared inside if: gone after end
        execute("{{ if .N }}{{ $w := 1 }}{{ end }}{{ $w }}", data)
    assert execute('{{ if eq .X "b" }}1{{ else if eq .N 3 }}2{{ else }}3{{ end }}', data) == "2"
    assert execute("{{ range $i, $m := .L }}{{ $i }}{{ $m }}{{ end }}", {"L": ["p", "q"]}) == "0p1q"
    for bad in ["{{ .X | len }}", "{{ with .X }}{{ end }}", '{{ printf "%s" .X }}', "{{/* c */}}", "{{ if .N }}",
                "{{ eq .X 1 }}", "{{ .Missing }}", "{{ index .L 5 }}", "{{ `raw` }}", "{{ 1.5 }}", "{{ end }}",
                "{{ template \"t\" }}", "{{ range .L }}{{ break }}{{ end }}"]:
        with pytest.raises(Unsupported):
            execute(bad, dict(data, L=["p"]))


def test_ollama_merges_consecutive_messages_of_one_role():
    system, msgs = collate([{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                            {"role": "user", "content": "c"}, {"role": "system", "content": "d"}])
    assert system == "a\n\nd" and [(m.Role, m.Content) for m in msgs] == [
        ("system", "a"), ("user", "b\n\nc"), ("system", "d")]


# ---------------------------------------------------------------------------
# Real models' chat templates
# ---------------------------------------------------------------------------


def _check_against_hf(tok, want, add_bos, bos=""):
    fmt, why = ollama.chat_format(tok, add_bos)
    assert fmt is not None and fmt.name == want, why
    for conv in CONVERSATIONS:
        assert hf_prompt(tok, conv) == bos + ollama_prompt(fmt.template, conv), conv
    return fmt


@needs(SMOLLM2)
def test_smollm2_template_is_its_chat_template_in_go():
    tok = gguf_tokenizer_of(SMOLLM2)
    fmt = _check_against_hf(tok, "chatml", add_bos=False)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in fmt.template
    assert fmt.stops == ("<|im_start|>", "<|im_end|>") and end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    cpp = llamacpp(SMOLLM2)  # llama.cpp, running the file's own template, builds the same prompts
    for conv in CONVERSATIONS[:20]:
        assert cpp.apply_template(conv) == ollama_prompt(fmt.template, conv), conv


@pytest.mark.slow
@needs(GEMMA3)
def test_gemma3_template_is_its_chat_template_in_go():
    tok = gguf_tokenizer_of(GEMMA3)  # the base model: the instruction-tuned models' template is given here
    assert tok.chat_template is None and ollama.chat_format(tok, True)[0] is None
    tok._tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    fmt = _check_against_hf(tok, "gemma", add_bos=True, bos="<bos>")
    assert fmt.stops == ("<end_of_turn>",) and end_of_turn(tok) == tok.convert_tokens_to_ids("<end_of_turn>")


# ---------------------------------------------------------------------------
# Export: the GGUF's metadata and the Modelfile beside it (tiny models, always run)
# ---------------------------------------------------------------------------


def chatml_tokenizer(directory, chat_template=CHATML_TEMPLATE):
    """A byte-level BPE tokenizer with ChatML's special tokens and ``chat_template``."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny.CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", chat_template=chat_template)
    fast.save_pretrained(str(directory))
    return load_tokenizer(directory)


def _source(tmp_path, tok, arch="llama", name="src"):
    if arch == "gemma3_text":
        config = dict(tiny.CONFIGS[arch], vocab_size=len(tok._tokenizer), **GEMMA)
        model = tiny._MODULES[arch].Model(tiny._MODULES[arch].ModelArgs.from_dict(config))
    else:
        model, config = tiny.make_model(arch, 0)
    mlxqat.save(model, tok, tmp_path / name, config=config)
    return tmp_path / name


@pytest.fixture(scope="module")
def chatml_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatml")
    tok = chatml_tokenizer(root / "tok")
    return _source(root, tok), tok


@pytest.fixture(scope="module")
def gemma_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    tok = spm_tokenizer(root / "tok")
    tok._tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return _source(root, tok, "gemma3_text"), tok


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith(
        ("_id", "_token", "model", "pre"))}


def _export(src, out, capsys, *flags):
    assert ex.main([str(src), "--format", "gguf", "--type", "f32", "--exact", "--out", str(out), *flags]) == 0
    return capsys.readouterr().err


def test_chatml_export_writes_the_metadata_and_a_modelfile_that_chats_like_the_model(tmp_path, chatml_src, capsys):
    src, tok = chatml_src
    out = tmp_path / "tiny-chat-f32.gguf"
    err = _export(src, out, capsys, "--name", "Tiny Chat")
    meta = _fields(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    assert meta["general.name"] == "Tiny Chat"
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE == tok.chat_template  # verbatim
    assert meta["tokenizer.ggml.bos_token_id"] == ids["<|im_start|>"]
    assert meta["tokenizer.ggml.eos_token_id"] == meta["tokenizer.ggml.eot_token_id"] == ids["<|im_end|>"]
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False

    modelfile = tmp_path / "tiny-chat-f32.Modelfile"  # beside the GGUF, named after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-chat-f32.Modelfile", "tiny-chat-f32.gguf"]
    assert is_mlxqat_output(modelfile)
    commands = parse_modelfile(modelfile.read_text())
    assert commands[0] == ("model", "./tiny-chat-f32.gguf")
    assert [v for c, v in commands if c == "stop"] == ["<|im_start|>", "<|im_end|>"]
    template = dict(commands)["template"]
    for conv in CONVERSATIONS:
        assert ollama_prompt(template, conv) == hf_prompt(tok, conv), conv
    assert f"ollama create tiny-chat -f {modelfile}" in err and "TEMPLATE chatml" in err

    cpp = llamacpp(out)  # llama.cpp reads the template from the file and renders as Hugging Face does
    assert cpp.props()["chat_template"] == CHATML_TEMPLATE
    for conv in CONVERSATIONS[:12]:
        assert cpp.apply_template(conv) == hf_prompt(tok, conv), conv


def test_gemma_export_writes_the_metadata_and_a_modelfile_that_chats_like_the_model(tmp_path, gemma_src, capsys):
    src, tok = gemma_src
    out = tmp_path / "g.gguf"
    err = _export(src, out, capsys)
    meta = _fields(out)
    assert meta["general.name"] == "src"  # the source folder's name, by default
    assert meta["tokenizer.chat_template"] == GEMMA3_CHAT_TEMPLATE
    assert meta["tokenizer.ggml.bos_token_id"] == CONTROL.index("<bos>")
    assert meta["tokenizer.ggml.eos_token_id"] == CONTROL.index("<eos>")
    assert meta["tokenizer.ggml.eot_token_id"] == CONTROL.index("<end_of_turn>")
    assert meta["tokenizer.ggml.add_bos_token"] is True  # Ollama adds <bos>; the TEMPLATE does not write it

    commands = parse_modelfile((tmp_path / "g.Modelfile").read_text())
    assert [v for c, v in commands if c == "stop"] == ["<end_of_turn>"]
    template = dict(commands)["template"]
    for conv in CONVERSATIONS:
        assert "<bos>" + ollama_prompt(template, conv) == hf_prompt(tok, conv), conv
    assert "ollama create g -f" in err

    # llama.cpp's own Gemma format (not the Jinja template): an independent reference
    cpp = llamacpp(out, jinja=False)
    for conv in [c for c in CONVERSATIONS if c[-1]["role"] == "user"][:12]:
        assert cpp.apply_template(conv) == ollama_prompt(template, conv), conv


@pytest.mark.parametrize("template,stops,why", [
    (OTHER_TEMPLATE, ["<|endoftext|>"], "not one mlxqat writes for Ollama"),
    (NEAR_CHATML, ["<|im_end|>"], "not one mlxqat writes for Ollama"),
    (None, [], "no chat template"),
])
def test_other_chat_templates_get_no_template_and_say_so(tmp_path, capsys, template, stops, why):
    tok = chatml_tokenizer(tmp_path / "tok", template)
    src = _source(tmp_path, tok)
    out = tmp_path / "m.gguf"
    err = _export(src, out, capsys)
    text = (tmp_path / "m.Modelfile").read_text()
    commands = parse_modelfile(text)
    assert "template" not in dict(commands) and [v for c, v in commands if c == "stop"] == stops
    assert f"# no TEMPLATE: {'the tokenizer has' if template is None else 'the chat template is'}" in text
    assert why in text and "without a TEMPLATE: " in err and why in err
    meta = _fields(out)
    assert meta.get("tokenizer.chat_template") == template
    assert meta.get("tokenizer.ggml.eot_token_id") == (tok.convert_tokens_to_ids(stops[0]) if stops else None)


# ---------------------------------------------------------------------------
# Nothing lost: the Modelfile replaces only mlxqat's own, atomically
# ---------------------------------------------------------------------------


def test_a_users_modelfile_is_refused_before_any_work(tmp_path, chatml_src, capsys):
    src, _ = chatml_src
    mine = tmp_path / "m.Modelfile"
    mine.write_text("FROM llama3\nSYSTEM my own\n")
    assert ex.main([str(src), "--format", "gguf", "--type", "f32", "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {mine} already exists") and err.count("\n") == 1, err
    assert "--no-modelfile" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile"] and mine.read_text().startswith("FROM llama3")
    # --no-modelfile writes the GGUF alone
    _export(src, tmp_path / "m.gguf", capsys, "--no-modelfile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]
    assert mine.read_text() == "FROM llama3\nSYSTEM my own\n"


def test_mlxqats_modelfile_is_replaced_but_not_once_edited(tmp_path, chatml_src, capsys):
    src, _ = chatml_src
    out, modelfile = tmp_path / "m.gguf", tmp_path / "m.Modelfile"
    _export(src, out, capsys)
    first = modelfile.read_bytes()
    _export(src, out, capsys)  # its own: replaced (the same bytes)
    assert modelfile.read_bytes() == first
    modelfile.write_bytes(first + b"PARAMETER temperature 0.2\n")  # the user's edit makes it theirs
    assert not is_mlxqat_output(modelfile)
    assert ex.main([str(src), "--format", "gguf", "--type", "f32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {modelfile} already exists") and "edited" in err
    assert modelfile.read_bytes().endswith(b"temperature 0.2\n")


def test_the_modelfile_is_written_atomically(tmp_path, chatml_src, capsys, monkeypatch):
    src, _ = chatml_src
    out, modelfile = tmp_path / "m.gguf", tmp_path / "m.Modelfile"
    _export(src, out, capsys)
    before = modelfile.read_bytes()
    write_bytes = Path.write_bytes

    def half_then_fail(self, data):
        if self.name.startswith(".m.Modelfile.tmp-"):
            write_bytes(self, data[: len(data) // 2])
            raise OSError("disk full (injected)")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(OSError, match="injected"):
        ex.export_gguf(src, out, "f32", exact=True, verbose=False)
    assert modelfile.read_bytes() == before  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]  # no temporary left


def test_library_call_reports_the_modelfile(tmp_path, chatml_src):
    src, _ = chatml_src
    result = ex.export_gguf(src, tmp_path / "x.gguf", "f32", exact=True, verbose=False)
    assert result["modelfile"] == str(tmp_path / "x.Modelfile") and result["chat_format"] == "chatml"
    assert result["ollama_create"] == f"ollama create x -f {tmp_path / 'x.Modelfile'}"
    none = ex.export_gguf(src, tmp_path / "y.gguf", "f32", exact=True, modelfile=False, verbose=False)
    assert none["modelfile"] is None and not (tmp_path / "y.Modelfile").exists()
    assert os.path.exists(tmp_path / "y.gguf")
