"""``gptevo info``: what a model directory holds and what running it costs, without loading the weights.

From the config (gptevo.calculators, exact integers): shape, context, parameters, weight memory per
dtype, bytes read per decoded token, and the KV cache in the dtype the engine actually stores it in
(the compute dtype: float32, or float64 with ``--dtype float64``; gptevo/kv_cache.py), per token and at
``--context`` tokens (default: the model's context, at most 4096; a larger value than the model's
context is refused). From the files: the stored dtypes (tensor count and bytes per safetensors dtype,
read from the headers only) and the size on disk. From the tokenizer: its kind and source, the special
token ids (bos, eos, pad) with their text, and the chat format ``gptevo chat`` would use.
"""
from __future__ import annotations

import json
import os


def add_subparser(sub, env) -> None:
    """Add ``info`` to the ``gptevo`` subcommands."""
    from gptevo.cli import HelpFormatter, model_flags

    i = sub.add_parser("info", help="sizes, dtypes, tokens, KV cache and memory of a model (weights not loaded)",
                       formatter_class=HelpFormatter)
    model_flags(i, env, backend=False)
    i.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens for the KV-cache figures (default: the model's context, at most 4096)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)


def model_info(config, context: int, kv_dtype: str = "float32") -> dict:
    """Sizes and memory of a config, from gptevo.calculators (exact integers); KV in ``kv_dtype``."""
    from gptevo import calculators as C

    counts = C.parameter_count(config)
    dtypes = ("float32", "bfloat16", "float16", "int8", "mxfp4")
    info = {
        "family": config.family,
        "layers": config.num_layers, "hidden_size": config.hidden_size, "heads": config.num_heads,
        "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "vocab_size": config.vocab_size,
        "context": config.context_length, "experts": config.num_experts,
        "experts_per_token": config.experts_per_token, "sliding_window": config.sliding_window,
        "parameters_total": counts["total"],
        "parameters_active": C.active_parameters(config),
        "parameters_active_with_embedding": C.active_parameters(config, count_embedding=True),
        "kv_cache_dtype": kv_dtype,
        "kv_cache_bytes_per_token": C.kv_cache_bytes(config, 1, kv_dtype),
        "kv_cache_context_tokens": context,
        "kv_cache_bytes_at_context": C.kv_cache_bytes(config, context, kv_dtype),
        "kv_cache_bytes_per_token_bf16": C.kv_cache_bytes(config, 1, "bfloat16"),
        "kv_cache_bytes_at_context_bf16": C.kv_cache_bytes(config, context, "bfloat16"),
        "bytes_per_token_bf16": C.bytes_per_token(config, "bfloat16", context_tokens=context, kv_dtype=kv_dtype),
        "weight_memory": {d: C.weight_memory(config, d) for d in dtypes},
    }
    if config.is_moe:
        info["weight_memory"]["mxfp4_experts_only"] = C.weight_memory(config, "mxfp4", experts_only=True)
        info["bytes_per_token_mxfp4_experts"] = C.bytes_per_token(config, "mxfp4", context_tokens=context,
                                                                  experts_only=True, kv_dtype=kv_dtype)
    return info


def files_info(path: str) -> dict:
    """Stored dtypes (tensors and bytes per safetensors dtype) and disk sizes; {} without weights."""
    from gptevo.checkpoint import Checkpoint
    from gptevo.model_files import locate

    if locate(path).weights_dir is None:
        return {}
    with Checkpoint(path) as ck:
        dtypes: dict[str, dict[str, int]] = {}
        for name in ck.names():
            t = ck.info(name)
            entry = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += t.nbytes
        files = ck.files
    return {"stored_dtypes": dict(sorted(dtypes.items())),
            "weight_files": [os.path.basename(f) for f in files],
            "weight_bytes_on_disk": sum(os.path.getsize(f) for f in files),
            "directory_bytes_on_disk": _tree_size(path)}


def _tree_size(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(root, n))
            except OSError:
                pass
    return total


def tokens_info(path: str, config, env) -> dict:
    """Special token ids with their text, the tokenizer's kind and the chat format (or why not)."""
    from gptevo import cli
    from gptevo.errors import GptevoError

    out: dict = {"special_tokens": {"bos": config.bos_token_id, "eos": list(config.eos_token_ids),
                                    "pad": config.pad_token_id}}
    try:
        from gptevo.tokenizer import load_tokenizer

        tok = load_tokenizer(path, vocab_size=config.vocab_size, **cli._tokenizer_locations(env))
    except GptevoError as exc:
        out["tokenizer"] = {"error": cli.cli_message(exc)}
        return out
    kind = {"HFTokenizer": "tokenizer.json (tokenizers)", "HarmonyTokenizer": "o200k_harmony (tiktoken)"}
    out["tokenizer"] = {"kind": kind.get(type(tok).__name__, type(tok).__name__), "source": tok.source,
                        "vocab_size": tok.vocab_size}
    ids = [config.bos_token_id, *config.eos_token_ids, config.pad_token_id]
    out["special_token_text"] = {str(t): tok.decode([t]) for t in ids if t is not None}
    from gptevo.cli_chat import chat_mode

    holder = type("ModelDir", (), {"path": path})()
    mode, extra = chat_mode(holder, tok)
    out["chat_format"] = {"harmony": "harmony (gpt-oss)", "continue": "none (chat continues the text)",
                          "template": f"chat template ({getattr(extra, 'source', '')})"}[mode]
    return out


def cmd_info(args, env, stdin, out, err) -> int:
    from gptevo import cli
    from gptevo.config_adapters import load_config
    from gptevo.errors import RequestError

    path = args.model or cli.bundled_model_dir()
    config = load_config(path)
    context = args.context if args.context is not None else min(config.context_length, 4096)
    if context < 0:
        raise RequestError(f"--context must be >= 0, got {context}")
    if context > config.context_length:
        raise RequestError(f"--context {context} is beyond the model's context of {config.context_length} "
                           f"positions (max_position_embeddings in {path}/config.json)")
    info = {**model_info(config, context, args.dtype), **files_info(path), **tokens_info(path, config, env)}
    if args.json:
        out.write(json.dumps({"path": path, **info}, indent=2) + "\n")
        return 0
    out.write("\n".join(info_lines(path, info, context)) + "\n")
    return 0


def info_lines(path: str, info: dict, context: int) -> list[str]:
    """The text report of ``gptevo info`` (one fact per line)."""
    from gptevo.cli import human_bytes, human_count

    w = info["weight_memory"]
    lines = [
        f"model            {path}",
        f"family           {info['family']}",
        f"shape            {info['layers']} layers, hidden {info['hidden_size']}, {info['heads']} heads "
        f"({info['kv_heads']} KV) x {info['head_dim']}, vocab {info['vocab_size']}",
        f"context          {info['context']} positions",
    ]
    if info["experts"]:
        lines.append(f"experts          {info['experts_per_token']} of {info['experts']} per token")
    if info["sliding_window"]:
        lines.append(f"sliding window   {info['sliding_window']}")
    lines += [
        f"parameters       {human_count(info['parameters_total'])} total ({info['parameters_total']:,})",
        f"active/token     {human_count(info['parameters_active'])} ({info['parameters_active']:,}; "
        f"{info['parameters_active_with_embedding']:,} with the embedding table)",
    ]
    if "stored_dtypes" in info:
        stored = ", ".join(f"{d} {v['tensors']} tensors ({human_bytes(v['bytes'])})"
                           for d, v in info["stored_dtypes"].items())
        lines += [f"stored dtypes    {stored}",
                  f"on disk          {human_bytes(info['weight_bytes_on_disk'])} in {len(info['weight_files'])} "
                  f"weight file(s); {human_bytes(info['directory_bytes_on_disk'])} for the whole directory"]
    else:
        lines.append("stored dtypes    no safetensors weights found")
    tok = info["tokenizer"]
    lines.append(f"tokenizer        {tok['kind']}, {tok['vocab_size']} tokens, {tok['source']}" if "kind" in tok
                 else f"tokenizer        not loaded: {tok['error']}")
    text = info.get("special_token_text", {})

    def named(t):
        return "none" if t is None else (f"{t} {text[str(t)]!r}" if str(t) in text else str(t))

    sp = info["special_tokens"]
    lines.append(f"special tokens   bos {named(sp['bos'])}; eos {', '.join(named(t) for t in sp['eos']) or 'none'}; "
                 f"pad {named(sp['pad'])}")
    if "chat_format" in info:
        lines.append(f"chat format      {info['chat_format']}")
    kv = info["kv_cache_dtype"]
    lines += [
        f"KV cache         {human_bytes(info['kv_cache_bytes_per_token'])} per token ({kv}, the engine's cache "
        f"dtype); {human_bytes(info['kv_cache_bytes_at_context'])} at {context} tokens",
        f"read per token   {human_bytes(info['bytes_per_token_bf16'])} (bf16 weights + {kv} KV at {context} tokens)",
    ]
    if "bytes_per_token_mxfp4_experts" in info:
        lines.append(f"                 {human_bytes(info['bytes_per_token_mxfp4_experts'])} "
                     f"(MXFP4 experts, as gpt-oss ships)")
    lines.append("weight memory    " + ", ".join(f"{d} {human_bytes(b)}" for d, b in w.items()))
    return lines
