"""The one factory of tiny random-weight models for tests: every family Perennial supports, with a tokenizer
and a chat template.

    model, tokenizer = tiny("phi3")            # 2 layers, hidden 32, GQA 4/2 heads, eager attention
    model = tiny_model("llama", vocab_size=48, num_key_value_heads=4)   # bare token ids, no tokenizer
    tokenizer = tiny_tokenizer()               # ChatML template; bos <|im_start|>, eos <|im_end|> (as SmolLM2)
    tokenizer = tiny_tokenizer(chat_template=None)   # no template: Perennial's default one applies

Each model is built from its family's own transformers config (the code paths a user's checkpoint
takes: fused projections, q/k/v biases, tied embeddings, soft-capping, sliding windows, learned
positions, Conv1D), seeded, so two calls with the same arguments give the same weights.
"""

from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# ChatML, as SmolLM2-135M-Instruct and Qwen2 ship it (system message allowed).
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A template that refuses system messages, as Gemma's do.
NO_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)

# bos and eos as SmolLM2 names them; <tool_call> is one more special token no template writes.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<tool_call>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = [
    "What is 2+2? Four. Quatre. And times 3? Twelve. Douze.",
    "system user assistant Answer in French. Be brief.",
    "the cat sat on the mat and the dog ate the bone",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals",
    "Hello! How are you today? I am fine, thank you.",
] * 4


def tiny_tokenizer(chat_template: str | None = CHATML, vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (digits one per token) with SPECIAL_TOKENS; bos <|im_start|>, eos <|im_end|>."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<s>", "</s>", "<tool_call>", "<start_of_turn>", "<end_of_turn>"],
    )
    wrapped.chat_template = chat_template
    return wrapped


# family -> (config class, its own keyword arguments). Llama-shaped sizes: hidden 32, 2 layers, 4 query / 2 KV heads.
_LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256)
FAMILIES: dict[str, tuple[type, dict]] = {
    "llama": (transformers.LlamaConfig, dict(_LLAMA_SHAPE, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(_LLAMA_SHAPE, tie_word_embeddings=True)),  # q/k/v biases, tied
    "qwen2-untied": (transformers.Qwen2Config, dict(_LLAMA_SHAPE, tie_word_embeddings=False)),
    "gemma2": (transformers.Gemma2Config, dict(_LLAMA_SHAPE, head_dim=8, sliding_window=8)),  # soft-capping, tied
    "mistral": (transformers.MistralConfig, dict(_LLAMA_SHAPE, sliding_window=8, tie_word_embeddings=False)),
    "phi3": (transformers.Phi3Config, dict(_LLAMA_SHAPE, tie_word_embeddings=False)),  # fused qkv_proj, gate_up_proj
    "gpt_neox": (transformers.GPTNeoXConfig, dict(  # fused query_key_value (per-head interleaved), no MLP gate
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)),
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),  # Conv1D, learned positions, tied
    "falcon": (transformers.FalconConfig, dict(  # fused query_key_value, new decoder architecture (GQA), tied
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
        max_position_embeddings=256)),
    # Families whose projections are resolved (models/families.py) but not in the training matrix.
    "gemma": (transformers.GemmaConfig, dict(_LLAMA_SHAPE, head_dim=8)),
    "olmo2": (transformers.Olmo2Config, dict(_LLAMA_SHAPE, tie_word_embeddings=False)),
    "starcoder2": (transformers.Starcoder2Config, dict(_LLAMA_SHAPE)),  # Llama attention names, c_fc / c_proj MLP
    "phi": (transformers.PhiConfig, dict(_LLAMA_SHAPE)),  # dense, fc1, fc2
    "bloom": (transformers.BloomConfig, dict(hidden_size=32, n_layer=2, n_head=4)),  # ALiBi: no position limit
    "gpt_bigcode": (transformers.GPTBigCodeConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gptj": (transformers.GPTJConfig, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "opt": (transformers.OPTConfig, dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                         word_embed_proj_dim=32, max_position_embeddings=64)),
}


def tiny_model(family: str = "llama", tokenizer: transformers.PreTrainedTokenizerBase | None = None, seed: int = 0, *,
               vocab_size: int | None = None, attn_implementation: str | None = "eager",
               **overrides) -> transformers.PreTrainedModel:
    """A seeded random-weight causal LM of ``family`` (a key of FAMILIES) sized for ``tokenizer``'s vocabulary.

    ``vocab_size`` instead of a tokenizer: a model of bare token ids (special-token ids as the family's
    config has them, unless ``overrides`` set them). ``overrides`` are the family config's own keywords
    (sizes, ``tie_word_embeddings``, ...); ``attn_implementation`` None is transformers' default (sdpa)."""
    config_class, kwargs = FAMILIES[family]
    if vocab_size is None:
        tokenizer = tokenizer or tiny_tokenizer()
        ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    else:
        ids = dict(vocab_size=vocab_size)
    config = config_class(**{**kwargs, **ids, **overrides})
    torch.manual_seed(seed)
    implementation = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return transformers.AutoModelForCausalLM.from_config(config, **implementation).eval()


def tiny(family: str = "llama", seed: int = 0, chat_template: str | None = CHATML, **overrides):
    """(model, tokenizer) of ``family``, the tokenizer with ``chat_template``."""
    tokenizer = tiny_tokenizer(chat_template)
    return tiny_model(family, tokenizer, seed, **overrides), tokenizer
