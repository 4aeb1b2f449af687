#!/usr/bin/env python3
"""vllm-block-hash: golden values for pdgate_core::kv (hash.rs, events.rs).

    scripts/vllm-block-hash.py            block hashes (sha256_cbor, xxhash_cbor)
    scripts/vllm-block-hash.py --events   msgspec encodings of a small KV event batch

Reproduces, with the same libraries vLLM uses (cbor2, xxhash, msgspec from
PyPI), the functions an external router must match. Each is written after the
vLLM source read (vllm-project/vllm, not copied):

- vllm/v1/core/kv_cache_utils.py @ 001cabc1be16a59a70d720ed61a13b678c060a18:
  init_none_hash (NONE_HASH = hash_fn(PYTHONHASHSEED)), hash_block_tokens
  (hash_fn((parent, tuple(block tokens), extra_keys))), get_request_block_hasher
  (full blocks only, chained), maybe_convert_block_hash (low 64 bits).
- vllm/utils/hashing.py @ ac621345a4eb18058bb24b242b457f634d476b40 (sha256_cbor:
  sha256(cbor2.dumps(x, canonical=True))) and the later stored copy that adds
  xxhash_cbor (xxhash.xxh3_128_digest(cbor2.dumps(x, canonical=True))).
- vllm/distributed/kv_events.py @ 0181ea3173e53eea8cf04a86891488e3dc89bb34 (map
  events, tag under "type") and @ b4e69e0af33f4698e157a262cc787fe61983cd3d
  (array_like=True: positional, tag first).

Without cbor2/xxhash/msgspec importable, the script makes a virtualenv under
$PDGATE_PY_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/pdgate/vllm-block-hash),
installs them there with pip, and runs itself again with it.
"""

import hashlib
import os
import subprocess
import sys
import venv

NEEDS = ["cbor2", "xxhash", "msgspec"]


def ensure_deps():
    try:
        import cbor2  # noqa: F401
        import msgspec  # noqa: F401
        import xxhash  # noqa: F401
        return
    except ImportError:
        pass
    if os.environ.get("PDGATE_VLLM_HASH_REEXEC"):
        sys.exit("vllm-block-hash: the virtualenv lacks " + " ".join(NEEDS))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    root = os.environ.get("PDGATE_PY_CACHE") or os.path.join(cache, "pdgate", "vllm-block-hash")
    py = os.path.join(root, "bin", "python")
    if not os.path.exists(py):
        venv.create(root, with_pip=True)
    subprocess.check_call([py, "-m", "pip", "install", "-q"] + NEEDS)
    env = dict(os.environ, PDGATE_VLLM_HASH_REEXEC="1")
    os.execve(py, [py, os.path.abspath(__file__)] + sys.argv[1:], env)


# --- vllm/utils/hashing.py -------------------------------------------------


def sha256_cbor(x):
    import cbor2

    return hashlib.sha256(cbor2.dumps(x, canonical=True)).digest()


def xxhash_cbor(x):
    import cbor2
    import xxhash

    return xxhash.xxh3_128_digest(cbor2.dumps(x, canonical=True))


ALGOS = [("sha256_cbor", sha256_cbor), ("xxhash_cbor", xxhash_cbor)]


# --- vllm/v1/core/kv_cache_utils.py ----------------------------------------


def none_hash(hash_fn, seed):
    # init_none_hash with PYTHONHASHSEED=seed: the seed *string* is hashed.
    return hash_fn(seed)


def hash_block_tokens(hash_fn, root, parent, tokens, extra_keys=None):
    if not parent:
        parent = root
    return hash_fn((parent, tuple(tokens), extra_keys))


def block_hashes(hash_fn, root, block_size, tokens, extras=None):
    # request_block_hasher: only full blocks, each chained to the one before.
    out, parent, start = [], None, 0
    while start + block_size <= len(tokens):
        extra = extras[len(out)] if extras else None
        h = hash_block_tokens(hash_fn, root, parent, tokens[start : start + block_size], extra)
        out.append(h)
        parent, start = h, start + block_size
    return out


def key64(h):
    # maybe_convert_block_hash with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES set.
    return int.from_bytes(h, byteorder="big") & ((1 << 64) - 1)


# Cases: (name, seed, block_size, tokens, per-block extra keys or None).
WIDE = [1, 23, 24, 255, 256, 65535, 65536, 128255, 4294967295, 0, 151643, 100000, 7]
CASES = [
    ("small16", "0", 16, list(range(10, 46)), None),  # 2 blocks + 4 tokens ignored
    ("wide4", "42", 4, WIDE, None),  # 3 blocks + 1 ignored; every CBOR int width
    ("long32", "0", 32, list(range(1000, 1032)), None),  # array head 0x98 0x20
    ("extra4", "0", 4, list(range(1, 9)), [("lora-a", "salt-1"), ("lora-a",)]),
]


def print_hashes():
    for name, fn in ALGOS:
        for seed in ("0", "42"):
            print(f"{name} none seed={seed} {none_hash(fn, seed).hex()}")
        for case, seed, bs, tokens, extras in CASES:
            root = none_hash(fn, seed)
            for i, h in enumerate(block_hashes(fn, root, bs, tokens, extras)):
                print(f"{name} {case} block={i} {h.hex()} key64={key64(h):#018x}")


# --- vllm/distributed/kv_events.py -----------------------------------------


def print_events():
    import msgspec

    # Field layouts, oldest first: "v1" is b4e69e0 (int hashes, no medium);
    # "array" adds medium and lora_name (the positional layout pdgate's encoder
    # writes); "array10" also extra_keys and group_idx (positional); "map" is
    # 0181ea3 (events as maps tagged under "type").
    def classes(layout):
        kw = dict(omit_defaults=True, gc=False)
        if layout != "map":
            kw["array_like"] = True

        class Event(msgspec.Struct, tag=True, **kw):
            pass

        class AllBlocksCleared(Event):
            pass

        if layout == "v1":

            class EventBatch(msgspec.Struct, **kw):
                ts: float
                events: list

            class BlockStored(Event):
                block_hashes: list
                parent_block_hash: "int | None"
                token_ids: "list[int]"
                block_size: int
                lora_id: "int | None"

            class BlockRemoved(Event):
                block_hashes: list

            return EventBatch, BlockStored, BlockRemoved, AllBlocksCleared

        class EventBatch(msgspec.Struct, **kw):
            ts: float
            events: list
            data_parallel_rank: "int | None" = None

        if layout == "array":

            class BlockStored(Event):
                block_hashes: list
                parent_block_hash: "bytes | int | None"
                token_ids: "list[int]"
                block_size: int
                lora_id: "int | None"
                medium: "str | None"
                lora_name: "str | None"

            class BlockRemoved(Event):
                block_hashes: list
                medium: "str | None"

        else:

            class BlockStored(Event):
                block_hashes: list
                parent_block_hash: "bytes | int | None"
                token_ids: "list[int]"
                block_size: int
                lora_id: "int | None"
                medium: "str | None"
                lora_name: "str | None"
                extra_keys: "list | None" = None
                group_idx: "int | None" = None

            class BlockRemoved(Event):
                block_hashes: list
                medium: "str | None"
                group_idx: "int | None" = None

        return EventBatch, BlockStored, BlockRemoved, AllBlocksCleared

    for layout in ("v1", "array", "array10", "map"):
        batch, stored, removed, cleared = classes(layout)
        if layout == "v1":
            events = [stored([11, 2**64 - 1], None, [1, 2, 300, 70000], 2, None), removed([7])]
            b = batch(ts=1.5, events=events + [cleared()])
        else:
            events = [
                stored([bytes(range(16))], None, [1, 2, 300, 70000], 4, None, "GPU", None),
                removed([7, 2**64 - 1], None),
            ]
            b = batch(ts=1.5, events=events + [cleared()], data_parallel_rank=0)
        print(f"{layout} {msgspec.msgpack.encode(b).hex()}")


if __name__ == "__main__":
    ensure_deps()
    if sys.argv[1:] == ["--events"]:
        print_events()
    elif sys.argv[1:]:
        sys.exit(__doc__)
    else:
        print_hashes()
