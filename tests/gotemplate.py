"""Go's ``text/template``, in Python, for the subset the Ollama TEMPLATEs mlxqat writes use (no Go here).

* :func:`execute`: text with ``{{-`` / ``-}}`` trimming; ``range $i, $x := PIPE``, ``if`` / ``else if`` / ``else`` / ``end``; variables
  declared (``:=``) and assigned (``=``), scoped as Go scopes them; fields of ``.`` and of a
  parenthesized pipeline; string and integer constants; the functions ``eq ne and or not len slice
  index``. Anything else (pipes, ``with``, comments, other functions, raw strings, ...) raises
  :class:`Unsupported`, so a template that leaves the subset fails a test instead of being guessed at.

Written from the behaviour of Go's text/template, not from its text. Ollama's side of a chat
(merging messages, the Modelfile parser) is in ``ollama_side.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


class Unsupported(ValueError):
    """A construct outside the subset this interpreter implements (or a Go template error)."""


# ---------------------------------------------------------------------------
# Lexing: text and actions
# ---------------------------------------------------------------------------

_SPACE = " \t\r\n"


def _action_end(template: str, i: int) -> int:
    """Where the action starting at ``i`` closes (``}}``), past the string constants inside it."""
    while i < len(template):
        if template.startswith("}}", i):
            return i
        c = template[i]
        if c in "\"`":
            j = i + 1
            while j < len(template) and template[j] != c:
                if c == '"' and template[j] == "\\":
                    j += 1
                elif c == '"' and template[j] == "\n":
                    raise Unsupported("newline in a string constant")
                j += 1
            if j >= len(template):
                raise Unsupported("unterminated string constant")
            i = j
        i += 1
    raise Unsupported("unclosed action")


def _split(template: str) -> List[Tuple[str, str]]:
    """``[("text", s) | ("action", body)]`` with Go's trim markers applied to the text."""
    out: List[Tuple[str, str]] = []
    pos = 0
    trim_next = False
    while True:
        start = template.find("{{", pos)
        text = template[pos:] if start < 0 else template[pos:start]
        if trim_next:
            text = text.lstrip(_SPACE)
        if start < 0:
            out.append(("text", text))
            return out
        body_start = start + 2
        if template.startswith("-", body_start) and template[body_start + 1: body_start + 2] in tuple(_SPACE):
            text = text.rstrip(_SPACE)
            body_start += 1
        out.append(("text", text))
        end = _action_end(template, body_start)
        body_end = end
        trim_next = False
        if template[end - 1] == "-" and template[end - 2] in _SPACE:
            body_end = end - 1
            trim_next = True
        body = template[body_start:body_end]
        if body.strip().startswith("/*"):
            raise Unsupported("comments are outside the subset")
        out.append(("action", body))
        pos = end + 2


_TOKEN = re.compile(r"""
    (?P<space>[ \t\r\n]+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`)
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<comma>,)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<number>-?[0-9][0-9A-Za-z_.]*)
  | (?P<variable>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


def _go_unquote(literal: str) -> str:
    """A Go interpreted string literal's value (the escapes Go allows)."""
    out, i, body = [], 0, literal[1:-1]
    simple = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in simple:
            out.append(simple[e])
            i += 2
        elif e in "uU":
            n = 4 if e == "u" else 8
            code = int(body[i + 2: i + 2 + n], 16)
            if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF or len(body[i + 2: i + 2 + n]) != n:
                raise Unsupported(f"invalid Unicode escape in {literal}")
            out.append(chr(code))
            i += 2 + n
        else:
            raise Unsupported(f"escape \\{e} is outside the subset ({literal})")
    return "".join(out)


def _tokens(body: str) -> List[Tuple[str, str]]:
    toks = []
    for m in _TOKEN.finditer(body):
        kind = m.lastgroup
        if kind == "space":
            continue
        if kind in ("raw", "pipe", "other"):
            raise Unsupported(f"{m.group()!r} is outside the subset (in {{{{{body}}}}})")
        toks.append((kind, m.group()))
    return toks


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


@dataclass
class Const:
    value: Any


@dataclass
class Var:
    name: str
    fields: Tuple[str, ...] = ()


@dataclass
class Field:  # fields of dot
    fields: Tuple[str, ...]


@dataclass
class Call:
    name: str
    args: List[Any]


@dataclass
class Chain:  # (pipeline).Field
    inner: Any
    fields: Tuple[str, ...]


@dataclass
class Pipeline:
    decl: Tuple[str, ...] = ()
    assign: bool = False
    command: Any = None


@dataclass
class If:
    branches: List[Tuple[Pipeline, list]] = field(default_factory=list)
    otherwise: Optional[list] = None


@dataclass
class Range:
    pipe: Pipeline
    body: list
    otherwise: Optional[list] = None


FUNCTIONS = ("eq", "ne", "and", "or", "not", "len", "slice", "index")


class _Parser:
    def __init__(self, toks, body):
        self.toks, self.i, self.body = toks, 0, body

    def peek(self, k=0):
        return self.toks[self.i + k] if self.i + k < len(self.toks) else (None, None)

    def take(self, kind=None):
        tok = self.peek()
        if tok[0] is None or (kind and tok[0] != kind):
            raise Unsupported(f"expected {kind or 'a token'} in {{{{{self.body}}}}}, got {tok[1]!r}")
        self.i += 1
        return tok

    def done(self):
        return self.i >= len(self.toks)

    def pipeline(self, range_decl=False) -> Pipeline:
        decl, assign = (), False
        if self.peek()[0] == "variable":
            names = [self.peek()[1]]
            k = 1
            if range_decl and self.peek(1)[0] == "comma" and self.peek(2)[0] == "variable":
                names.append(self.peek(2)[1])
                k = 3
            if self.peek(k)[0] in ("declare", "assign"):
                assign = self.peek(k)[0] == "assign"
                decl = tuple(names)
                self.i += k + 1
        command = self.command()
        return Pipeline(decl, assign, command)

    def command(self):
        kind, text = self.peek()
        if kind == "word" and text not in ("true", "false", "nil"):
            self.take()
            if text not in FUNCTIONS:
                raise Unsupported(f"function {text!r} is outside the subset (in {{{{{self.body}}}}})")
            args = []
            while not self.done() and self.peek()[0] != "rparen":
                args.append(self.operand())
            return Call(text, args)
        op = self.operand()
        if not self.done() and self.peek()[0] != "rparen":
            raise Unsupported(f"can't give argument to non-function in {{{{{self.body}}}}}")
        return op

    def operand(self):
        kind, text = self.take()
        if kind == "string":
            node = Const(_go_unquote(text))
        elif kind == "number":
            if not re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
                raise Unsupported(f"number {text!r} is outside the subset (integers only)")
            node = Const(int(text))
        elif kind == "word" and text in ("true", "false"):
            node = Const(text == "true")
        elif kind == "variable":
            fields = ()
            if self.peek()[0] == "field" and self.peek()[1] != ".":
                fields = tuple(self.take()[1].split(".")[1:])
            node = Var(text, fields)
        elif kind == "field":
            node = Field(() if text == "." else tuple(text.split(".")[1:]))
        elif kind == "lparen":
            inner = self.command()
            self.take("rparen")
            fields = ()
            if self.peek()[0] == "field" and self.peek()[1] != ".":
                fields = tuple(self.take()[1].split(".")[1:])
            node = Chain(inner, fields)
        else:
            raise Unsupported(f"{text!r} is outside the subset (in {{{{{self.body}}}}})")
        return node


def parse(template: str) -> list:
    """The template's node list; raises :class:`Unsupported` outside the subset."""
    pieces = _split(template)
    pos = 0

    def block(stop_words):
        nonlocal pos
        nodes = []
        while pos < len(pieces):
            kind, body = pieces[pos]
            if kind == "text":
                if body:
                    nodes.append(body)
                pos += 1
                continue
            toks = _tokens(body)
            if not toks:
                raise Unsupported("empty action")
            word = toks[0][1] if toks[0][0] == "word" else None
            if word in ("end", "else"):
                if word not in stop_words:
                    raise Unsupported(f"unexpected {{{{{body}}}}}")
                return nodes, toks
            pos += 1
            if word in ("with", "define", "template", "block", "break", "continue", "nil"):
                raise Unsupported(f"{word!r} is outside the subset")
            if word == "if":
                nodes.append(if_node(toks, body))
            elif word == "range":
                p = _Parser(toks[1:], body)
                pipe = p.pipeline(range_decl=True)
                if not p.done():
                    raise Unsupported(f"trailing tokens in {{{{{body}}}}}")
                inner, end = block(("end", "else"))
                node = Range(pipe, inner)
                pos += 1
                if end[0][1] == "else":
                    if len(end) != 1:
                        raise Unsupported("else if after range")
                    node.otherwise, end = block(("end",))
                    pos += 1
                if len(end) != 1:
                    raise Unsupported(f"{{{{end}}}} takes nothing: {end}")
                nodes.append(node)
            else:
                p = _Parser(toks, body)
                pipe = p.pipeline()
                if not p.done():
                    raise Unsupported(f"trailing tokens in {{{{{body}}}}}")
                nodes.append(pipe)
        if stop_words:
            raise Unsupported(f"missing {{{{end}}}} (expected one of {stop_words})")
        return nodes, None

    def if_node(toks, body):
        nonlocal pos
        node = If()
        while True:
            p = _Parser(toks[1:] if toks[0][1] == "if" else toks[2:], body)
            cond = p.pipeline()
            if cond.decl or not p.done():
                raise Unsupported(f"declarations in if are outside the subset ({{{{{body}}}}})")
            inner, end = block(("end", "else"))
            node.branches.append((cond, inner))
            pos += 1
            if end[0][1] == "end":
                if len(end) != 1:
                    raise Unsupported("{{end}} takes nothing")
                return node
            if len(end) > 1:  # else if
                if end[1] != ("word", "if"):
                    raise Unsupported(f"else {end[1][1]!r} is outside the subset")
                toks = end
                continue
            node.otherwise, end = block(("end",))
            pos += 1
            if len(end) != 1:
                raise Unsupported("{{end}} takes nothing")
            return node

    nodes, _ = block(())
    return nodes


# ---------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------


@dataclass
class Message:
    """Ollama's api.Message as a template sees it (the fields mlxqat's templates may use)."""

    Role: str
    Content: str
    Images: Optional[list] = None
    ToolCalls: Optional[list] = None
    Thinking: str = ""
    ToolName: str = ""


def _truth(v) -> bool:
    if isinstance(v, Message):
        return True  # a non-nil pointer
    if v is None or isinstance(v, (bool, int, str, list, tuple, dict)):
        return bool(v)
    raise Unsupported(f"truth of {type(v).__name__}")


def _basic(v):
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, str):
        return ("string", v)
    raise Unsupported(f"eq/ne of a {type(v).__name__}: only basic types compare")


class _Exec:
    def __init__(self, data):
        self.vars: List[List] = [["$", data]]
        self.out: List[str] = []

    def lookup(self, name):
        for entry in reversed(self.vars):
            if entry[0] == name:
                return entry
        raise Unsupported(f"undefined variable {name}")

    @staticmethod
    def field(value, name):
        if isinstance(value, dict):
            if name not in value:
                raise Unsupported(f"map has no key {name!r} (this subset refuses missing keys)")
            return value[name]
        if isinstance(value, Message):
            if not hasattr(value, name):
                raise Unsupported(f"can't evaluate field {name} in type *api.Message")
            return getattr(value, name)
        raise Unsupported(f"can't evaluate field {name} of {type(value).__name__}")

    def value(self, node, dot):
        if isinstance(node, Const):
            return node.value
        if isinstance(node, Var):
            v = self.lookup(node.name)[1]
            for f in node.fields:
                v = self.field(v, f)
            return v
        if isinstance(node, Field):
            v = dot
            for f in node.fields:
                v = self.field(v, f)
            return v
        if isinstance(node, Chain):
            v = self.value(node.inner, dot)
            for f in node.fields:
                v = self.field(v, f)
            return v
        if isinstance(node, Call):
            return self.call(node, dot)
        raise Unsupported(f"node {node!r}")

    def call(self, node: Call, dot):
        name, args = node.name, node.args
        if name in ("and", "or"):
            if not args:
                raise Unsupported(f"{name} needs arguments")
            v = None
            for a in args:  # short-circuit, returning the deciding argument (Go 1.18)
                v = self.value(a, dot)
                if _truth(v) == (name == "or"):
                    return v
            return v
        vals = [self.value(a, dot) for a in args]
        if name == "not":
            if len(vals) != 1:
                raise Unsupported("not takes one argument")
            return not _truth(vals[0])
        if name in ("eq", "ne"):
            if len(vals) < 2 or (name == "ne" and len(vals) != 2):
                raise Unsupported(f"wrong number of arguments for {name}")
            first = _basic(vals[0])
            others = [_basic(v) for v in vals[1:]]
            if any(o[0] != first[0] for o in others):
                raise Unsupported("incompatible types for comparison")
            same = any(o[1] == first[1] for o in others)
            return same if name == "eq" else not same
        if name == "len":
            if len(vals) != 1:
                raise Unsupported("len takes one argument")
            v = vals[0]
            if isinstance(v, str):
                return len(v.encode("utf-8"))  # Go's len of a string counts bytes
            if isinstance(v, (list, dict)):
                return len(v)
            raise Unsupported(f"len of {type(v).__name__}")
        if name == "slice":
            if not 1 < len(vals) <= 3 or not isinstance(vals[0], list):
                raise Unsupported("slice: a list and one or two indexes (strings are outside the subset)")
            seq, idx = vals[0], vals[1:]
            if any(not isinstance(i, int) or isinstance(i, bool) for i in idx):
                raise Unsupported("slice indexes must be integers")
            lo, hi = idx[0], idx[1] if len(idx) > 1 else len(seq)
            if not 0 <= lo <= hi <= len(seq):
                raise Unsupported(f"slice index out of range: {lo}:{hi} of {len(seq)}")
            return seq[lo:hi]
        if name == "index":
            if len(vals) != 2:
                raise Unsupported("index: one container, one index (the subset)")
            seq, i = vals
            if isinstance(seq, list):
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(seq):
                    raise Unsupported(f"index out of range: {i}")
                return seq[i]
            raise Unsupported(f"index of {type(seq).__name__}")
        raise Unsupported(f"function {name}")

    def emit(self, v):
        if isinstance(v, bool):
            self.out.append("true" if v else "false")
        elif isinstance(v, (int, str)):
            self.out.append(str(v))
        else:
            raise Unsupported(f"printing a {type(v).__name__} is outside the subset")

    def pipeline(self, pipe: Pipeline, dot):
        v = self.value(pipe.command, dot)
        if pipe.decl:
            if len(pipe.decl) != 1:
                raise Unsupported("two variables outside range")
            if pipe.assign:
                self.lookup(pipe.decl[0])[1] = v
            else:
                self.vars.append([pipe.decl[0], v])
            return None  # a declaration or assignment prints nothing
        return v

    def walk(self, nodes, dot):
        for node in nodes:
            if isinstance(node, str):
                self.out.append(node)
            elif isinstance(node, Pipeline):
                v = self.pipeline(node, dot)
                if not node.decl:
                    self.emit(v)
            elif isinstance(node, If):
                self.run_if(node, dot)
            elif isinstance(node, Range):
                self.run_range(node, dot)
            else:
                raise Unsupported(f"node {node!r}")

    def scoped(self, nodes, dot):
        mark = len(self.vars)
        try:
            self.walk(nodes, dot)
        finally:
            del self.vars[mark:]

    def run_if(self, node: If, dot):
        for cond, body in node.branches:
            if _truth(self.value(cond.command, dot)):
                self.scoped(body, dot)
                return
        if node.otherwise is not None:
            self.scoped(node.otherwise, dot)

    def run_range(self, node: Range, dot):
        seq = self.value(node.pipe.command, dot)
        if not isinstance(seq, list):
            raise Unsupported(f"range over {type(seq).__name__} is outside the subset")
        if node.pipe.assign:
            raise Unsupported("range with = is outside the subset")
        mark = len(self.vars)
        decl = node.pipe.decl
        for name in decl:
            self.vars.append([name, None])
        try:
            if not seq and node.otherwise is not None:
                self.scoped(node.otherwise, dot)
            for i, elem in enumerate(seq):
                if len(decl) == 2:  # range $i, $x := (Go sets the element in the last one)
                    self.vars[mark][1], self.vars[mark + 1][1] = i, elem
                elif len(decl) == 1:
                    self.vars[mark][1] = elem
                self.scoped(node.body, elem)
        finally:
            del self.vars[mark:]


def execute(template: str, data: Dict[str, Any]) -> str:
    """Run ``template`` (the subset) on ``data`` as Go's text/template does."""
    ex = _Exec(data)
    ex.walk(parse(template), data)
    return "".join(ex.out)
