"""Ollama's side of a Modelfile, in Python, for tests (no Ollama here).

* :func:`ollama_prompt`: what Ollama does with a TEMPLATE that names ``.Messages``: merge
  consecutive messages of one role, collect the system messages, execute the Go template
  (``gotemplate.py``).
* :func:`parse_modelfile`: Ollama's Modelfile parser (its state machine: comments, commands,
  quoted and triple-quoted values, only printable characters kept outside the separators).

Written from the behaviour of Ollama's parser and template packages, not from their text.
"""

from __future__ import annotations

import unicodedata
from typing import Dict, List, Sequence, Tuple

from gotemplate import Message, Unsupported, execute


def collate(messages: Sequence[Dict[str, str]]) -> Tuple[str, List[Message]]:
    """Ollama's ``collate``: consecutive messages of one role merged with a blank line (tool
    messages kept apart); the system messages joined the same way."""
    system, out = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1].Role == m["role"] and m["role"] != "tool":
            out[-1].Content += "\n\n" + m["content"]
        else:
            out.append(Message(m["role"], m["content"]))
    return "\n\n".join(system), out


def ollama_prompt(template: str, messages: Sequence[Dict[str, str]]) -> str:
    """The prompt Ollama renders for a chat request with ``messages`` and a TEMPLATE that names ``.Messages``."""
    if "Messages" not in template:
        raise Unsupported("only templates that name .Messages (Ollama's chat path) are modelled")
    system, collated = collate(messages)
    data = {"System": system, "Messages": collated, "Tools": None, "Response": "", "Think": False,
            "IsThinkSet": False, "Query": "", "Document": "", "Instruction": ""}
    return execute(template, data)


# Ollama's Modelfile parser

_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires")


def _go_isprint(c: str) -> bool:
    return c == " " or unicodedata.category(c)[0] in "LMNPS"


def _unquote(s: str) -> Tuple[str, bool]:
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def parse_modelfile(text: str) -> List[Tuple[str, str]]:
    """``[(command, value)]`` as Ollama's parser reads a Modelfile (``from`` is named ``model``,
    a ``PARAMETER name value`` is ``(name, value)``)."""
    NIL, NAME, VALUE, PARAM, MESSAGE, COMMENT = range(6)
    cmds: List[Tuple[str, str]] = []
    buf: List[str] = []
    cur, name, role = NIL, "", ""

    def step(r, cs):
        if cs == NIL:
            if r == "#":
                return COMMENT, ""
            if r in " \t\r\n":
                return NIL, ""
            return NAME, r
        if cs == NAME:
            if r.isascii() and r.isalpha():
                return NAME, r
            if r in " \t":
                return VALUE, ""
            raise Unsupported("invalid command")
        if cs == VALUE:
            return (NIL, r) if r in " \t\r\n" else (VALUE, r)
        if cs == PARAM:
            if (r.isascii() and r.isalnum()) or r == "_":
                return PARAM, r
            if r in " \t":
                return VALUE, ""
            raise Unsupported("unexpected EOF")
        if cs == MESSAGE:
            if r.isascii() and r.isalpha():
                return MESSAGE, r
            if r in " \t":
                return VALUE, ""
            raise Unsupported("unexpected EOF")
        if cs == COMMENT:
            return (NIL, "") if r in "\r\n" else (COMMENT, "")
        raise Unsupported("state")

    for r in text:
        nxt, r = step(r, cur)
        if nxt != cur:
            s = "".join(buf)
            if cur == NAME:
                if s.lower() not in _COMMANDS:
                    raise Unsupported(f"invalid command {s!r}")
                low = s.lower()
                if low == "from":
                    name = "model"
                elif low == "parameter":
                    nxt = PARAM
                elif low == "message":
                    nxt, name = MESSAGE, low
                else:
                    name = low
            elif cur == PARAM:
                name = s
            elif cur == MESSAGE:
                role = s
            elif cur == VALUE:
                value, ok = _unquote(s.strip(" \t\r\n"))
                if not ok or r in " \t":
                    buf.append(r)
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                cmds.append((name, value))
            buf = []
            cur = nxt
        if r and _go_isprint(r):
            buf.append(r)
    if cur == VALUE:
        value, ok = _unquote("".join(buf).strip(" \t\r\n"))
        if not ok:
            raise Unsupported("unexpected EOF in a quoted value")
        cmds.append((name, f"{role}: {value}" if role else value))
    elif cur not in (NIL, COMMENT):
        raise Unsupported("unexpected EOF")
    if not any(c == "model" for c, _ in cmds):
        raise Unsupported("no FROM line")
    return cmds
