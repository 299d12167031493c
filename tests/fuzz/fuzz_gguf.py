"""GGUF mutations for tests/fuzz/fuzz_loader.py: edits to header fields, metadata entries and tensor
descriptions of a valid file, and truncation."""

from __future__ import annotations

import functools
import os
import struct

from mlxqat.gguf.format import GGUF_SCALAR_BYTES as GGUF_SCALARS  # type id -> bytes

from fuzz_mutations import Case, evil_int, m_append, m_byte_flip, m_noop, m_special  # noqa: E402


@functools.lru_cache(maxsize=4)  # the seeds' layouts: most cases mutate a pristine copy
def gguf_layout(raw: bytes) -> dict:
    """Byte ranges of a valid GGUF file: fields [(offset, width, role)], KV and tensor-info blobs."""
    fields, pos = [(0, 4, "magic"), (4, 4, "version"), (8, 8, "n_tensors"), (16, 8, "n_kv")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    if max(n_tensors, n_kv) > len(raw):
        raise ValueError(f"{n_tensors} tensors, {n_kv} KVs in a {len(raw)}-byte file")

    def string(role):
        nonlocal pos
        n = struct.unpack_from("<Q", raw, pos)[0]
        fields.append((pos, 8, role))
        pos += 8 + n
        return raw[pos - n:pos]

    def value(vtype, role):
        nonlocal pos
        if vtype == 8:
            string(f"{role}_str_len")
        elif vtype == 9:
            fields.append((pos, 4, "arr_type"))
            atype, count = struct.unpack_from("<IQ", raw, pos)
            if count > len(raw):  # an earlier mutation of this case broke the file
                raise ValueError(f"array of {count} items in a {len(raw)}-byte file")
            fields.append((pos + 4, 8, "arr_len"))
            pos += 12
            for _ in range(count):
                value(atype, "arr_item")
        else:
            fields.append((pos, GGUF_SCALARS[vtype], f"{role}_{vtype}"))
            pos += GGUF_SCALARS[vtype]

    kvs = []
    for _ in range(n_kv):
        start = pos
        key = string("key_len").decode()
        vtype = struct.unpack_from("<I", raw, pos)[0]
        fields.append((pos, 4, "kv_type"))
        pos += 4
        value(vtype, "kv_value")
        kvs.append((key, raw[start:pos]))
    tis_start = pos
    for _ in range(n_tensors):
        string("ti_name_len")
        n_dims = struct.unpack_from("<I", raw, pos)[0]
        if n_dims > len(raw):
            raise ValueError(f"{n_dims} dims")
        fields.append((pos, 4, "ti_n_dims"))
        pos += 4
        for i in range(n_dims):
            fields.append((pos + 8 * i, 8, "ti_dim"))
        pos += 8 * n_dims
        fields += [(pos, 4, "ti_type"), (pos + 4, 8, "ti_offset")]
        pos += 12
    data_start = pos + (-pos % 32)
    return dict(fields=fields, kvs=kvs, tis=raw[tis_start:pos], data=raw[data_start:], n_tensors=n_tensors)


def _gguf_build(raw: bytes, layout: dict, kvs: list) -> bytes:
    head = raw[:8] + struct.pack("<QQ", layout["n_tensors"], len(kvs)) + b"".join(b for _, b in kvs) + layout["tis"]
    return head + b"\0" * (-len(head) % 32) + layout["data"]


def _kv(key: str, vtype: int, payload: bytes) -> tuple:
    k = key.encode()
    return key, struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def m_gguf_field(c: Case) -> str:
    raw = bytearray(c.pick().read_bytes())
    fields = gguf_layout(bytes(raw))["fields"]
    roles = sorted({r for _, _, r in fields})
    role = c.rng.choice(roles)
    off, width, _ = c.rng.choice([f for f in fields if f[2] == role])
    old = int.from_bytes(raw[off:off + width], "little")
    new = evil_int(c.rng, width, old)
    raw[off:off + width] = new.to_bytes(width, "little")
    c.root.write_bytes(bytes(raw))
    return f"gguf_field {role} at {off}: {old} -> {new}"


def m_gguf_kv(c: Case) -> str:
    raw = c.pick().read_bytes()
    layout = gguf_layout(raw)
    kvs = list(layout["kvs"])
    op = c.rng.choice(["alignment", "alignment", "drop", "duplicate", "retype"])
    if op == "alignment":
        val = c.rng.choice([0, 1, 3, 7, 31, 64, 2**31, 2**32 - 1])
        kvs.append(_kv("general.alignment", 4, struct.pack("<I", val)))
        desc = f"general.alignment = {val} (data still at 32-byte alignment)"
    elif op == "drop":
        i = c.rng.randrange(len(kvs))
        desc = f"drop KV {kvs[i][0]}"
        del kvs[i]
    elif op == "duplicate":
        i = c.rng.randrange(len(kvs))
        kvs.insert(c.rng.randrange(len(kvs) + 1), kvs[i])
        desc = f"duplicate KV {kvs[i][0]}"
    else:
        i = c.rng.randrange(len(kvs))
        key = kvs[i][0]
        vtype, payload = c.rng.choice([(8, struct.pack("<Q", 1) + b"x"), (4, struct.pack("<I", 2**31)),
                                       (6, struct.pack("<f", float("nan"))), (9, struct.pack("<IQ", 4, 0)),
                                       (9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0)), (7, b"\x02")])
        kvs[i] = _kv(key, vtype, payload)
        desc = f"KV {key} retyped to type {vtype}"
    c.root.write_bytes(_gguf_build(raw, layout, kvs))
    return f"gguf_kv {desc}"


def m_gguf_truncate(c: Case) -> str:
    raw = c.pick().read_bytes()
    fields = gguf_layout(raw)["fields"]
    cut = c.rng.choice([0, 3, 4, 8, 23, 24, len(raw) - 1, len(raw) // 2, c.rng.randrange(len(raw))] +
                       [c.rng.choice(fields)[0] + d for d in (0, 1)])
    os.truncate(c.root, cut)
    return f"gguf_truncate {len(raw)} -> {cut} bytes"


GGUF_MUTATIONS = {
    "gguf_field": (m_gguf_field, 6), "gguf_kv": (m_gguf_kv, 2), "gguf_truncate": (m_gguf_truncate, 2),
    "byte_flip": (m_byte_flip, 2), "append": (m_append, 0.5), "special": (m_special, 0.5), "noop": (m_noop, 0.1),
}
