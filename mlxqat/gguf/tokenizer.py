"""The model's tokenizer in a GGUF file, read from its Hugging Face ``tokenizer.json``.

llama.cpp tokenizes with what the GGUF file embeds, so the file must make it
split text exactly as the model's own tokenizer does. Two kinds are written:

* byte-level BPE (``tokenizer.ggml.model = "gpt2"``): the vocabulary, the
  merges and the name of llama.cpp's pre-tokenizer (regex split) that equals
  the tokenizer's own (GPT-2, SmolLM, Llama 3, Qwen 2);
* SentencePiece-style BPE with byte fallback (``"llama"``: Gemma, Llama 2,
  Mistral): ``▁`` stands for a space, and llama.cpp merges the adjacent pair
  whose result has the highest *score*, falling back to ``<0xXX>`` byte
  tokens. ``tokenizer.json`` has merge ranks, not scores, so the scores are
  made from the ranks (a token's score falls with the rank of its first
  merge); that gives llama.cpp the same merges in the same order, which is
  checked: every pair of reachable tokens that joins into a token must be a
  merge, and the merges into one token must be consecutive.

Whatever llama.cpp would split differently (another normalizer or
pre-tokenizer, word-splitting, dropout, stripped added tokens) is refused
with the reason, rather than written as a file that tokenizes wrongly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .format import GGUFExportError, Metadata

# llama.cpp's pre-tokenizer names (llama-vocab.cpp) grouped by the split they mean.
_GPT2_SPLIT = "gpt2"  # ByteLevel's own regex


_SMOLLM = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2")


_GPT2 = ("gpt-2", "phi-2", "mpt", "olmo", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "exaone4")


_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")


_LLAMA3_KEEP_MERGES = ("dbrx", "smaug-bpe")  # the Llama 3 split without ignore_merges


_QWEN2 = ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2")


#: Pre-tokenizer names this importer reproduces.
PRE_TOKENIZERS = tuple(sorted(_SMOLLM + _GPT2 + _LLAMA3 + _LLAMA3_KEEP_MERGES + _QWEN2))


# Token texts llama.cpp ends generation on (besides eos), when the vocabulary has them.
_END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                      "<|end_of_text|>", "<EOT>")


_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED = (int(gguf.TokenType[k]) for k in ("UNKNOWN", "CONTROL", "USER_DEFINED"))


def _pre_tokenizer(pre: str, path: Path):

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2:
        return byte_level, False
    if pre in _SMOLLM:  # llama.cpp: "\p{N}" then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _LLAMA3 + _LLAMA3_KEEP_MERGES + _QWEN2:
        split = QWEN2_SPLIT if pre in _QWEN2 else LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), pre in _LLAMA3
    raise ValueError(
        f"{path}: tokenizer.ggml.pre={pre!r} is a pre-tokenizer mlxqat's GGUF import cannot reproduce yet; "
        f"supported: {', '.join(PRE_TOKENIZERS)}"
    )


def _spm_merges(tokens: List[str], scores: np.ndarray) -> List[Tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece merging: the best-scored result first."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-float(scores[i]), i, vocab[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _backend_tokenizer(meta: Metadata, tokens: List[str], types: np.ndarray, path: Path):
    """``(tokenizers.Tokenizer, add_space_prefix)`` as llama.cpp tokenizes with this vocabulary."""

    model = meta.str("tokenizer.ggml.model")
    if model == "gpt2":
        merges = []
        vocab = {t: i for i, t in enumerate(tokens)}
        for m in meta.strings("tokenizer.ggml.merges"):
            cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
            pair = (m[:cut], m[cut + 1:]) if cut > 0 else None
            if pair and pair[0] in vocab and pair[1] in vocab and pair[0] + pair[1] in vocab:
                merges.append(pair)
        pre, ignore_merges = _pre_tokenizer(meta.str("tokenizer.ggml.pre", ""), path)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        prefix = False
    elif model == "llama":
        scores = meta.numbers("tokenizer.ggml.scores", np.zeros(len(tokens)), dtype=np.float32)
        if len(scores) < len(tokens):
            raise ValueError(f"{path}: {len(scores)} tokenizer scores for {len(tokens)} tokens")
        unk = meta.int("tokenizer.ggml.unknown_token_id", 0, high=len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores), byte_fallback=True,
                                   unk_token=tokens[unk] if unk < len(tokens) else None, fuse_unk=True))
        prefix = meta.bool("tokenizer.ggml.add_space_prefix", True)
        steps = ([normalizers.Prepend(SPM_SPACE)] if prefix else []) + [normalizers.Replace(" ", SPM_SPACE)]
        tok.normalizer = normalizers.Sequence(steps)
        tok.decoder = decoders.Sequence(
            [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported by mlxqat's GGUF import "
                         "(supported: gpt2, i.e. byte-level BPE, and llama, i.e. SentencePiece)")
    # llama.cpp matches control, user-defined and unknown tokens whole before splitting the text.
    special = [AddedToken(t, special=k != _TT_USER_DEFINED, normalized=False)
               for t, k in zip(tokens, types.tolist()) if k in (_TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED)]
    tok.add_special_tokens([a for a in special if a.special])
    tok.add_tokens([a for a in special if not a.special])
    return tok, prefix


def gguf_tokenizer(meta: Metadata, n_vocab: int):
    """The file's tokenizer as an mlx-lm ``TokenizerWrapper`` (a Hugging Face fast tokenizer inside).

    Returns:
        ``(tokenizer, eos_token_ids)``.
    """
    # lazy: mlx_lm imports transformers (about 1 s); `import mlxqat` does not need it
    from mlx_lm.tokenizer_utils import (
        BPEStreamingDetokenizer,
        SPMStreamingDetokenizer,
        TokenizerWrapper,
    )

    # lazy: transformers costs about 1 s at import; only this path needs it
    from transformers import PreTrainedTokenizerFast

    path = meta.path
    tokens = meta.strings("tokenizer.ggml.tokens")
    if not tokens or len(tokens) > n_vocab:
        raise ValueError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding has {n_vocab} rows; "
                         "the vocabulary does not belong to this model")
    if len(set(tokens)) != len(tokens):
        seen = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise ValueError(f"{path}: token {dup!r} appears twice in tokenizer.ggml.tokens; the file is damaged")
    types = meta.numbers("tokenizer.ggml.token_type", np.ones(len(tokens)), dtype=np.int64)[: len(tokens)]
    if len(types) < len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens; the file is damaged")
    backend, prefix = _backend_tokenizer(meta, tokens, types, path)

    def token(key):
        i = meta.int(f"tokenizer.ggml.{key}_token_id", None, high=1 << 31)
        if i is not None and i >= len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id={i} is not a token id (< {len(tokens)})")
        return i

    bos, eos, unk, pad, eot = token("bos"), token("eos"), token("unknown"), token("padding"), token("eot")
    spm = meta.str("tokenizer.ggml.model") == "llama"
    add_bos = meta.bool("tokenizer.ggml.add_bos_token", spm or meta.str("tokenizer.ggml.pre", "") in _LLAMA3)
    add_eos = meta.bool("tokenizer.ggml.add_eos_token", False)
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ValueError(f"{path}: the tokenizer adds a bos/eos token but names none")
    single = " ".join(([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if add_eos else []))
    pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
    marks = {tokens[i]: i for i, on in ((bos, add_bos), (eos, add_eos)) if on}
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(marks.items()))
    named = {k: tokens[i] for k, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
             if i is not None}
    chat_template = meta.str("tokenizer.chat_template", None)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos,
                                   clean_up_tokenization_spaces=False, chat_template=chat_template, **named)
    index = {t: i for i, t in enumerate(tokens)}
    eos_ids = sorted({i for i in [eos, eot] if i is not None}
                     | {index[t] for t in _END_OF_GENERATION if t in index})
    detok = (lambda t: SPMStreamingDetokenizer(t, trim_space=prefix)) if spm else BPEStreamingDetokenizer
    return TokenizerWrapper(fast, detok, eos_token_ids=eos_ids), eos_ids


#: The character SentencePiece vocabularies write for a space.
SPM_SPACE = "\u2581"


#: Regex splits of llama.cpp's pre-tokenizers (llama-vocab.cpp), by the name the exporter writes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


_SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


_T = gguf.TokenType


# Scores llama.cpp's own converter gives tokens that are never merged into.
_ADDED_SCORE, _UNUSED_SCORE = -1000.0, -10000.0


def _error(where: Path, what: str) -> GGUFExportError:
    return GGUFExportError(f"{where}: {what}; llama.cpp would tokenize text differently from the model's tokenizer, "
                           "so mlxqat does not embed it")


def _pre_tokenizer_name(tok: dict, where: Path) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        if pre.get("add_prefix_space"):
            raise _error(where, "ByteLevel pre-tokenizer with add_prefix_space=true has no llama.cpp equivalent")
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and parts[1].get("type") == "ByteLevel" and parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space")):
            return "smollm"  # SmolLM: every digit alone, then GPT-2's byte-level split
        splits = [p for p in parts if p.get("type") == "Split"]
        if len(splits) == 1:
            name = _SPLIT_NAMES.get(splits[0].get("pattern", {}).get("Regex"))
            if name == "llama-bpe" and not (tok.get("model") or {}).get("ignore_merges"):
                raise _error(where, "Llama 3 pre-tokenizer without ignore_merges (llama.cpp always ignores merges "
                                    "for it, so words in the vocabulary would tokenize differently)")
            if name is not None:
                return name
    raise _error(where, f"pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp is known to reproduce "
                        "(supported: GPT-2 byte-level, SmolLM, Llama 3, Qwen 2)")


def _byte_level(tok: dict, path: Path) -> dict:
    norm = tok.get("normalizer")
    if norm is not None and norm.get("type") != "NFC":
        raise _error(path, f"normalizer {norm.get('type')!r} has no llama.cpp equivalent")
    return {"model": "gpt2", "pre": _pre_tokenizer_name(tok, path), "add_space_prefix": None}


def _is_replace(step: Optional[dict], old: str, new: str) -> bool:
    step = step or {}
    return step.get("type") == "Replace" and step.get("pattern") == {"String": old} and step.get("content") == new


def _space_prefix(tok: dict, path: Path) -> bool:
    """Whether the tokenizer prefixes a space (llama.cpp's ``add_space_prefix``); refuses what llama.cpp lacks.

    llama.cpp replaces spaces by ``▁`` and, with ``add_space_prefix``, puts one
    space before the text and after every special token: the Hugging Face
    ``Replace(" ", "▁")`` normalizer (Gemma), after ``Prepend("▁")`` (Llama 2),
    or a ``Metaspace`` pre-tokenizer that prepends always or never.
    """
    norm, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    steps = (norm.get("normalizers") if (norm or {}).get("type") == "Sequence" else [norm]) if norm else []
    if steps and _is_replace(steps[-1], " ", SPM_SPACE):
        prefix = steps[:-1] == [{"type": "Prepend", "prepend": SPM_SPACE}]
        if steps[:-1] and not prefix:
            raise _error(path, f"normalizer {json.dumps(norm)[:200]} (llama.cpp only replaces spaces by "
                               f"{SPM_SPACE!r} and may prepend one)")
        # Gemma's Split on " " finds no space left after the normalizer: it changes nothing.
        if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
            raise _error(path, f"pre-tokenizer {json.dumps(pre)[:200]} splits the text into words, which "
                               "llama.cpp's SentencePiece tokenizer does not")
        return prefix
    if norm is None and (pre or {}).get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE:
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if pre.get("split", True):
            raise _error(path, "Metaspace pre-tokenizer with split=true cuts the text at every space; llama.cpp "
                               "merges across spaces")
        if scheme == "first":
            raise _error(path, "Metaspace prepend_scheme='first' adds '▁' at the start of the text only; llama.cpp "
                               "also adds it after every special token (a tokenizer that prepends always or never "
                               "can be embedded)")
        return scheme == "always"
    raise _error(path, f"normalizer {json.dumps(norm)[:120]} with pre-tokenizer {json.dumps(pre)[:120]} is not a "
                       f"SentencePiece layout llama.cpp reproduces (spaces replaced by {SPM_SPACE!r}, optionally "
                       "one prepended)")


def _spm_scores(bpe: dict, texts: Dict[int, str], normal: set, path: Path) -> Dict[int, float]:
    """Scores under which llama.cpp's best-score-first merging makes the merges of ``bpe`` in their order.

    Args:
        texts: ``{id: token text}``; ``normal``: ids of the tokens BPE builds (not added, byte or unused).

    Raises:
        GGUFExportError: merges that no score order reproduces.
    """
    vocab = {t: i for i, t in texts.items() if i in normal}
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in bpe.get("merges", [])]
    order: Dict[str, int] = {}  # merged token -> its place among merged tokens
    last = None
    for left, right in merges:
        merged = left + right
        if merged not in vocab:
            continue  # a merge into an added token: the text never reaches BPE
        if merged != last and merged in order:
            raise _error(path, f"the merges into {merged!r} are not consecutive (another token's merge lies between "
                               "them); llama.cpp ranks merges by the token they make")
        order.setdefault(merged, len(order))
        last = merged
    known = {(left, right) for left, right in merges}
    reachable = set(order) | {t for t in vocab if len(t) == 1}
    for text in vocab:
        for cut in range(1, len(text)):
            pair = (text[:cut], text[cut:])
            if pair[0] in reachable and pair[1] in reachable and pair not in known:
                raise _error(path, f"tokens {pair[0]!r} and {pair[1]!r} join into the token {text!r} but the "
                                   "tokenizer has no such merge; llama.cpp merges every adjacent pair that forms a "
                                   "token")
    n = len(order)
    scores = {i: -float(order[t]) if t in order else -float(n + i) for t, i in vocab.items()}
    return scores


def _sentencepiece(tok: dict, texts: Dict[int, str], types: Dict[int, int], prefix: bool, path: Path) -> dict:
    bpe = tok["model"]
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if bpe.get(key):
            raise _error(path, f"BPE with {key}={bpe[key]!r} has no llama.cpp equivalent")
    if bpe.get("ignore_merges"):
        raise _error(path, "BPE with ignore_merges=true and byte fallback has no llama.cpp equivalent")
    have = set(texts.values())
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in have]
    if missing:
        raise _error(path, f"byte fallback without the byte token <0x{missing[0]:02X}> ({len(missing)} missing)")
    for i, t in texts.items():
        if types[i] == _T.NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = int(_T.BYTE)
    normal = {i for i, k in types.items() if k == _T.NORMAL}
    scores = _spm_scores(bpe, texts, normal, path)
    for i, k in types.items():
        if i not in scores:
            scores[i] = 0.0 if k == _T.BYTE else _UNUSED_SCORE if k == _T.UNUSED else _ADDED_SCORE
    return {"model": "llama", "pre": "default", "add_space_prefix": prefix, "scores": scores}


def _added_text(added: dict, spm: bool, prefix: bool, path: Path) -> str:
    """The text llama.cpp matches for an added token: the raw text whose normalized form Hugging Face matches."""
    content = added["content"]
    for key in ("lstrip", "rstrip", "single_word"):
        if added.get(key):
            raise _error(path, f"added token {content!r} has {key}=true (llama.cpp matches added tokens exactly)")
    if spm and added.get("normalized"):
        if prefix:
            raise _error(path, f"added token {content!r} is matched after the '▁' prefix is added")
        return content.replace(SPM_SPACE, " ")
    return content


def read_tokenizer(tokenizer_dir: Path, n_vocab: Optional[int] = None) -> dict:
    """The vocabulary of a ``tokenizer.json`` in GGUF terms.

    Args:
        tokenizer_dir: the model directory.
        n_vocab: the model's embedding rows (unused ids are padded); default: the tokenizer's own size.

    Returns:
        ``{"model", "pre", "tokens", "types", "scores", "add_space_prefix"}``: ``model`` is
        ``"gpt2"`` (byte-level BPE; ``scores`` and ``add_space_prefix`` are None) or ``"llama"``
        (SentencePiece-style BPE with byte fallback).

    Raises:
        FileNotFoundError: no ``tokenizer.json``.
        GGUFExportError: a tokenizer llama.cpp cannot reproduce (the reason is named).
    """
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: a GGUF embeds the tokenizer so llama.cpp can turn text into the "
            f"model's token ids. Copy the model's tokenizer files (tokenizer.json, "
            f"tokenizer_config.json) into {tokenizer_dir}"
        )
    tok = json.loads(path.read_text(encoding="utf-8"))
    bpe = tok.get("model") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    spm = bpe.get("type") == "BPE" and bool(bpe.get("byte_fallback"))
    if bpe.get("type") != "BPE" or not spm and decoder not in ("ByteLevel", None):
        raise GGUFExportError(
            f"{path}: only BPE tokenizers (byte-level, or SentencePiece-style with byte fallback) can be embedded "
            f"in GGUF by mlxqat (this one is {bpe.get('type')!r} with decoder {decoder!r})"
        )
    prefix = _space_prefix(tok, path) if spm else False
    texts: Dict[int, str] = {i: t for t, i in bpe["vocab"].items()}
    types: Dict[int, int] = {i: int(_T.NORMAL) for i in texts}
    for added in tok.get("added_tokens", []):
        texts[added["id"]] = _added_text(added, spm, prefix, path)
        types[added["id"]] = int(_T.CONTROL if added.get("special") else _T.USER_DEFINED)
    unk = bpe.get("unk_token")
    if unk is not None and unk in bpe["vocab"] and types[bpe["vocab"][unk]] == _T.NORMAL:
        types[bpe["vocab"][unk]] = int(_T.UNKNOWN)
    if n_vocab is None:
        n_vocab = max(texts) + 1 if texts else 0
    if texts and max(texts) >= n_vocab:
        raise GGUFExportError(
            f"{path} has token id {max(texts)} but the model's embedding has {n_vocab} rows; "
            "the tokenizer does not belong to this model"
        )
    for i in range(n_vocab):
        if i not in texts:
            texts[i], types[i] = f"[PAD{i}]", int(_T.UNUSED)
    seen: Dict[str, int] = {}
    for i in range(n_vocab):
        if seen.setdefault(texts[i], i) != i:
            raise _error(path, f"tokens {seen[texts[i]]} and {i} are both {texts[i]!r} (llama.cpp finds a token "
                               "by its text)")
    kind = _sentencepiece(tok, texts, types, prefix, path) if spm else _byte_level(tok, path)
    scores = kind.pop("scores", None)
    return dict(kind, tokens=[texts[i] for i in range(n_vocab)], types=[types[i] for i in range(n_vocab)],
                scores=None if scores is None else [scores[i] for i in range(n_vocab)])


def adds_bos_eos(tokenizer) -> Tuple[bool, bool]:
    """Whether ``tokenizer`` (a loaded one) really puts its bos / eos token around a text, whatever its
    configuration files claim: llama.cpp and Ollama add them when the GGUF says so."""
    with_special = list(tokenizer.encode("hello"))
    plain = list(tokenizer.encode("hello", add_special_tokens=False))
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return (bos is not None and with_special[:1] == [bos] != plain[:1],
            eos is not None and with_special[-1:] == [eos] != plain[-1:])


def end_of_turn(tokenizer) -> Optional[int]:
    """The id of the special token that closes an assistant turn in ``tokenizer``'s chat template
    (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``), or None (no chat template, or none found).

    Read from the template itself: a user turn and an assistant reply are rendered, and the longest
    special token that starts the text right after the reply is the one. llama.cpp stops a chat
    there (``tokenizer.ggml.eot_token_id``); without it, it guesses from token texts (on SmolLM2 it
    guesses ``<|endoftext|>``, not ``<|im_end|>``).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    reply = "mlxqat probe reply"
    conversation = [{"role": "user", "content": "mlxqat probe"}, {"role": "assistant", "content": reply}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    except Exception:  # a template that refuses this conversation (Jinja raise_exception): no answer
        return None
    if not isinstance(text, str) or reply not in text:
        return None
    rest = text[text.rindex(reply) + len(reply):]
    special = {str(t): int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
               if getattr(t, "special", False)}
    found = max((t for t in special if t and rest.startswith(t)), key=len, default=None)
    return special[found] if found is not None else None


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, tokenizer_dir: Path, n_vocab: int) -> None:
    """Write the tokenizer of ``tokenizer_dir`` (:func:`read_tokenizer`) and its special tokens to ``w``.

    ``tokenizer`` (the loaded one) says whether a bos/eos token is really added, whatever the
    configuration files claim; its chat template is written verbatim (``tokenizer.chat_template``,
    which Ollama, LM Studio and llama.cpp read), and the token that ends a chat turn as
    ``tokenizer.ggml.eot_token_id`` (:func:`end_of_turn`).
    """
    vocab = read_tokenizer(tokenizer_dir, n_vocab)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(vocab["add_space_prefix"])
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=vocab["model"] == "gpt2", n_vocab=n_vocab)
    special.add_special_token["bos"], special.add_special_token["eos"] = adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):  # the template the model is run with (mlx-lm, transformers), as it is
        special.chat_template = template
    eot = end_of_turn(tokenizer)
    if eot is not None and eot < n_vocab:
        special.special_token_ids["eot"] = eot
    special.add_to_gguf(w, quiet=True)


__all__ = ["LLAMA3_SPLIT", "QWEN2_SPLIT", "SPM_SPACE", "add_tokenizer", "adds_bos_eos", "end_of_turn",
           "read_tokenizer"]
