"""Ollama's ``Modelfile`` for an exported GGUF: ``FROM`` the file, the chat ``TEMPLATE`` in Ollama's
Go-template language, and ``PARAMETER stop`` for the tokens that end a turn.

The GGUF itself carries the model's chat template (``tokenizer.chat_template``, Jinja), which LM
Studio and llama.cpp run. Ollama formats prompts with a Go template instead, and when a Modelfile
names none it picks the nearest of its own by text similarity, which may not be the model's format.
A Jinja template cannot be translated in general, so this module recognises chat *formats* it can
write as Go templates, each checked against the tokenizer's own template on probe conversations
(:data:`PROBES`: with and without a system message, several turns, a reply to continue), string for
string, before a TEMPLATE is written:

* ``chatml``: ``<|im_start|>ROLE\\n...<|im_end|>\\n`` (as SmolLM2's), with the default
  system message the template inserts when a conversation has none;
* ``gemma``: ``<start_of_turn>user\\n...<end_of_turn>\\n``, the assistant as ``model``, a system
  message put before the first user message (Gemma 3's format).

The Go templates follow the semantics of the ones Ollama ships: ``.Messages`` after Ollama merges
consecutive messages of one role; a generation prompt unless the conversation ends with an
assistant message, which is then left open for the model to continue. What they cannot do: Go
templates in Ollama have no ``trim``, so message text with surrounding spaces is sent as it is
where Gemma's Jinja template strips it. For any other chat template no TEMPLATE is written, and
the Modelfile and the export say so.

The first line of a Modelfile mlxqat writes marks it (:data:`MARK`) with the sha256 of the rest:
mlxqat replaces such a file, and nothing else, and not once a user has edited it
(:func:`is_mlxqat_modelfile`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .._version import __version__

#: How the first line of a Modelfile written by mlxqat starts.
MARK = "# Ollama Modelfile written by mlxqat"


_MARK_LINE = re.compile(re.escape(MARK) + r" \S+; replaced by mlxqat only while unchanged \(sha256 ([0-9a-f]{64})\)")


_MAX_MODELFILE_BYTES = 1 << 20


Message = Dict[str, str]


#: Conversations a chat format must render exactly as the model's own template does (no message
#: text starts or ends with a space: Gemma's template strips it, which Ollama's Go templates cannot).
PROBES: Tuple[Tuple[Message, ...], ...] = tuple(
    tuple({"role": r, "content": c} for r, c in conversation) for conversation in (
        [("user", "Hello! Who are you?")],
        [("system", "You answer in French.\nKeep it short."), ("user", "What is 2+2?")],
        [("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one, in two\nlines?")],
        [("system", "Be terse."), ("user", "Capital of Italy?"), ("assistant", "Rome."),
         ("user", "And of Spain? Ünïcödé ✓")],
        [("user", "Start a poem."), ("assistant", "Roses are")],
        [("system", "You write code."), ("user", "def f(x):"), ("assistant", "if x:\n    return x * 2"),
         ("user", "Now in C."), ("assistant", "int f(int x) {")],
    ))


@dataclass(frozen=True)
class ChatFormat:
    """A chat format written as an Ollama Go template, checked against the model's chat template."""

    name: str  # "chatml" or "gemma"
    template: str  # the Go template (Ollama's TEMPLATE)
    stops: Tuple[str, ...]  # Ollama's PARAMETER stop values: the turn markers
    render: Callable[[Sequence[Message]], str]  # what ``template`` renders, in Python (the check)


def go_string(text: str) -> str:
    """``text`` as a Go string literal (``"..."``) made of printable characters only."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[c])
        elif not c.isprintable():
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _literal(text: str) -> str:
    """``text`` inside a Go template: as plain text where that is safe (readable in ``ollama show``),
    else as a string-literal action; either way the Modelfile parser keeps it whole."""
    if "{{" in text or '"' in text or any(not (c.isprintable() or c == "\n") for c in text):
        return "{{ " + go_string(text) + " }}"
    return text


_RANGE = "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}"


def chatml(default_system: Optional[str]) -> ChatFormat:
    """ChatML; ``default_system``: the system message a conversation without one gets (None: none)."""
    default = "" if default_system is None else (
        '\n{{- if and (eq $i 0) (ne .Role "system") }}<|im_start|>system\n'
        + _literal(default_system) + "<|im_end|>\n{{ end }}")
    template = (
        _RANGE + default + "<|im_start|>{{ .Role }}\n{{ .Content }}\n"
        '{{- if or (not $last) (ne .Role "assistant") }}<|im_end|>\n{{ end }}\n'
        '{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}\n'
        "{{- end }}")

    def render(messages: Sequence[Message]) -> str:
        out = []
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if i == 0 and m["role"] != "system" and default_system is not None:
                out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
            out.append(f"<|im_start|>{m['role']}\n{m['content']}")
            if not last or m["role"] != "assistant":
                out.append("<|im_end|>\n")
            if last and m["role"] != "assistant":
                out.append("<|im_start|>assistant\n")
        return "".join(out)

    return ChatFormat("chatml", template, ("<|im_start|>", "<|im_end|>"), render)


def gemma(separator: str) -> ChatFormat:
    """Gemma's turns; a leading system message goes before the first user message, then ``separator``."""
    template = (
        _RANGE + '\n{{- if or $i (ne .Role "system") }}<start_of_turn>'
        '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        '{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}{{ (index $.Messages 0).Content }}'
        + _literal(separator) + "{{ end }}{{ .Content }}\n"
        '{{- if or (not $last) (ne .Role "assistant") }}<end_of_turn>\n{{ end }}\n'
        "{{- end }}\n"
        '{{- if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}\n'
        "{{- end }}")

    def render(messages: Sequence[Message]) -> str:
        out = []
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if i or m["role"] != "system":
                out.append(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n")
                if i == 1 and messages[0]["role"] == "system":
                    out.append(messages[0]["content"] + separator)
                out.append(m["content"])
                if not last or m["role"] != "assistant":
                    out.append("<end_of_turn>\n")
            if last and m["role"] != "assistant":
                out.append("<start_of_turn>model\n")
        return "".join(out)

    return ChatFormat("gemma", template, ("<end_of_turn>",), render)


def render_chat(tokenizer, messages: Sequence[Message]) -> str:
    """The tokenizer's own chat template on ``messages``, as Ollama asks for a prompt: with the
    generation prompt, or, when the last message is the assistant's, continuing it."""
    cont = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=not cont,
                                         continue_final_message=cont)


def _between(text: str, start: str, end: str) -> Optional[str]:
    if not text.startswith(start) or end not in text[len(start):]:
        return None
    return text[len(start): text.index(end, len(start))]


def _candidates(tokenizer, prefix: str) -> List[ChatFormat]:
    """The formats the template might be, with their parameters read from one rendering each."""
    template = getattr(tokenizer, "chat_template", None) or ""
    out = []
    if "<|im_start|>" in template:
        text = render_chat(tokenizer, PROBES[0])[len(prefix):]
        default = _between(text, "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n")
        out.append(chatml(default))
    if "<start_of_turn>" in template:
        system, user = PROBES[1][0]["content"], PROBES[1][1]["content"]
        text = render_chat(tokenizer, PROBES[1])[len(prefix):]
        separator = _between(text, "<start_of_turn>user\n" + system, user + "<end_of_turn>\n")
        if separator is not None:
            out.append(gemma(separator))
    return out


def chat_format(tokenizer, add_bos: bool) -> Tuple[Optional[ChatFormat], str]:
    """The Ollama chat format that renders every :data:`PROBES` conversation as the tokenizer's own
    chat template does.

    Args:
        tokenizer: a loaded tokenizer (``apply_chat_template``; mlx-lm's or Hugging Face's).
        add_bos: whether the GGUF's tokenizer adds the bos token (then Ollama adds it, and the
            Jinja template's leading bos text is not the Go template's to write).

    Returns:
        ``(format, why)``: ``format`` None with the reason in ``why`` when no format matches.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None, "the tokenizer has no chat template (a base model): Ollama sends prompts as they are"
    prefix = (getattr(tokenizer, "bos_token", None) or "") if add_bos else ""
    unknown = ("the chat template is not one mlxqat writes for Ollama and checks (ChatML, Gemma); Ollama "
               "picks the nearest of its own templates, which may format conversations differently")
    try:
        candidates = _candidates(tokenizer, prefix)
        for fmt in candidates:
            if all(render_chat(tokenizer, p) == prefix + fmt.render(p) for p in PROBES):
                return fmt, f"{fmt.name}, the same text as the model's chat template on {len(PROBES)} conversations"
    except Exception as e:  # the Jinja template refuses a probe (raise_exception) or fails: not a known format
        return None, f"{unknown} (it fails on a probe conversation: {type(e).__name__}: {str(e)[:120]})"
    return None, unknown


def modelfile_path(gguf_path: Path) -> Path:
    """Where the Modelfile of ``gguf_path`` goes: ``model-q4_0.gguf`` -> ``model-q4_0.Modelfile``."""
    gguf_path = Path(gguf_path)
    if gguf_path.suffix.lower() == ".gguf":
        return gguf_path.with_suffix(".Modelfile")
    return gguf_path.with_name(gguf_path.name + ".Modelfile")


def check_gguf_name(gguf_path: Path) -> str:
    """The ``FROM`` value for ``gguf_path`` beside its Modelfile (``./NAME``).

    Raises:
        ValueError: a file name Ollama's Modelfile parser would change (a quote, a character that
            is not printable, or spaces at its end).
    """
    name = Path(gguf_path).name
    if '"' in name or name != name.strip() or any(not c.isprintable() for c in name):
        raise ValueError(f"{gguf_path}: Ollama's Modelfile cannot name a file called {name!r} in FROM; choose a "
                         "GGUF file name without quotes, control characters or trailing spaces, or pass "
                         "--no-modelfile")
    return "./" + name


def ollama_name(name: str) -> str:
    """A model name ``ollama create`` takes (lower case letters, digits, ``_ . -``), from ``name``."""
    clean = re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-_.")
    return clean[:80] or "model"


def _stop_line(stop: str) -> Optional[str]:
    # Ollama's Modelfile parser strips the quotes of a value and nothing else: no escapes
    if not stop or '"' in stop or any(not c.isprintable() for c in stop):
        return None
    return f'PARAMETER stop "{stop}"'


def modelfile_text(gguf_path: Path, fmt: Optional[ChatFormat], why: str, *, name: Optional[str] = None,
                   stops: Sequence[str] = ()) -> str:
    """The Modelfile of ``gguf_path`` (in the same folder): its mark, ``FROM``, ``TEMPLATE`` and stops.

    Args:
        fmt: the checked chat format (:func:`chat_format`), or None: no TEMPLATE, ``why`` says why.
        name: the Ollama model name the comment's ``ollama create`` line uses.
        stops: stop texts when there is no format (the end-of-turn token of an unknown template).

    Raises:
        ValueError: a GGUF file name the Modelfile cannot hold (:func:`check_gguf_name`).
    """
    source = check_gguf_name(gguf_path)
    this = modelfile_path(gguf_path).name
    name = ollama_name(name or Path(gguf_path).stem)
    why = " ".join(why.split())  # one comment line
    lines = [f"# ollama create {name} -f {shlex.quote(this)}   then: ollama run {name}"]
    lines.append(f"# TEMPLATE: {why}" if fmt is not None else f"# no TEMPLATE: {why}")
    lines.append(f"FROM {source}")
    if fmt is not None:
        if '"""' in fmt.template:
            raise ValueError("internal: a Go template with triple quotes cannot be a Modelfile TEMPLATE")
        lines.append(f'TEMPLATE """{fmt.template}"""')
        stops = fmt.stops
    lines += [line for line in map(_stop_line, stops) if line is not None]
    body = "\n".join(lines) + "\n"
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{MARK} {__version__}; replaced by mlxqat only while unchanged (sha256 {digest})\n" + body


def is_mlxqat_modelfile(path: Path) -> bool:
    """True if ``path`` is a Modelfile mlxqat wrote and nobody changed since (its first line's mark
    and the sha256 of the rest agree)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MODELFILE_BYTES:
            return False
        with open(path, "rb") as f:
            data = f.read(_MAX_MODELFILE_BYTES + 1)
    except OSError:
        return False
    first, sep, rest = data.partition(b"\n")
    try:
        match = _MARK_LINE.fullmatch(first.decode("utf-8"))
    except UnicodeDecodeError:
        return False
    return bool(sep) and match is not None and hashlib.sha256(rest).hexdigest() == match.group(1)


__all__ = ["MARK", "PROBES", "ChatFormat", "chat_format", "chatml", "gemma", "go_string", "is_mlxqat_modelfile",
           "modelfile_path", "modelfile_text", "ollama_name", "render_chat"]
