"""Turning canonical records into tensors: prompt rendering, response-only loss masks, packing.

Canonical records (what ingestion writes, one JSON object per line):
- text:        {"id": str, "text": str, "split": "train"|"test"}
- instruction: {"id": str, "task": str, "prompt": str, "response": str,
                "options": list[str] | None, "split": "train"|"test"}
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

IGNORE_INDEX = -100

# Used when a tokenizer has no chat template of its own (the tiny default has none).
DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer: the tokenizer's chat template, else the default."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return DEFAULT_PROMPT_TEMPLATE.format(prompt=prompt)


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids the model sees before its answer, special tokens included: the one prompt encoder
    of training, generation, option scoring and drift probes.

    With a chat template, the template alone decides the special tokens: the ids equal
    ``tokenizer.apply_chat_template([user turn], tokenize=True, add_generation_prompt=True)``.
    Adding a BOS as well doubled it: Llama-style templates emit ``{{ bos_token }}`` themselves, and
    ChatML tokenizers such as SmolLM2's name the template's own ``<|im_start|>`` their bos_token.
    Without a template: BOS (when the tokenizer has one) once, then the default template.
    """
    # apply_chat_template tokenizes the rendered text with add_special_tokens=False, as here.
    specials = [] if getattr(tokenizer, "chat_template", None) else _bos(tokenizer)
    return specials + tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=False)


def fit_prompt(prompt_ids: list[int], answer_length: int, max_length: int | None) -> tuple[list[int], int]:
    """Cut a prompt and an answer of ``answer_length`` tokens to ``max_length`` tokens, as training does.

    Returns (prompt ids kept, answer tokens kept). When the pair overflows, the answer keeps at
    most max(1, max_length // 2) tokens and the prompt keeps its end.
    ``max_length=None`` cuts nothing. Evaluation calls this with the training length so it feeds
    exactly the prompt window `encode_instruction` trained on (a model with learned absolute
    positions also has no positions beyond it).
    """
    if max_length is None:
        return prompt_ids, answer_length
    if len(prompt_ids) + answer_length > max_length:
        answer_length = min(answer_length, max(1, max_length // 2))
    budget = max_length - answer_length
    return prompt_ids[max(0, len(prompt_ids) - budget) :], answer_length


def prompt_window_text(tokenizer, prompt: str, answer_length: int, max_length: int | None) -> str:
    """The prompt window evaluation feeds (`encode_prompt` cut by `fit_prompt`), as text that re-encodes to it.

    Special tokens stay in the text (``<s>``, ``<|im_start|>``): a harness that encodes it with
    add_special_tokens=False and applies no chat template (lm-eval's defaults) feeds the same ids.
    Raises ValueError when the decoded text does not re-encode to the same ids (a tokenizer whose
    decode is lossy), since the harness would then score another prompt.
    """
    ids, _ = fit_prompt(encode_prompt(tokenizer, prompt), answer_length, max_length)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tokenizer.encode(text, add_special_tokens=False) != ids:
        raise ValueError(f"prompt {prompt[:60]!r}... does not survive decode and re-encode with this tokenizer, "
                         "so an external harness would not see the ids Perennial scores")
    return text


def encode_instruction(tokenizer, prompt: str, response: str, max_length: int) -> dict[str, list[int]]:
    """Prompt + response + EOS, with labels only on the response (loss masking for CIT).

    At most ``max_length`` tokens: over-long examples are cut by `fit_prompt` (the end of the
    prompt, and at least one response token), so the supervised tokens are never silently empty.
    """
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt_ids, kept = fit_prompt(encode_prompt(tokenizer, prompt), len(response_ids), max_length)
    response_ids = response_ids[:kept]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {"input_ids": input_ids, "labels": labels}


def pack_texts(tokenizer, texts: Iterable[str], block_size: int) -> list[list[int]]:
    """Concatenate documents (each closed by EOS) and cut into equal blocks: sequence packing for DAP.

    Plain text has no chat template, so each document gets BOS once (`encode_prompt`'s rule without one).
    """
    blocks: list[list[int]] = []
    buffer: list[int] = []
    for text in texts:
        buffer.extend(_bos(tokenizer) + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
        while len(buffer) >= block_size:
            blocks.append(buffer[:block_size])
            buffer = buffer[block_size:]
    if buffer and not blocks:
        blocks.append(buffer)
    return blocks


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of {input_ids, labels?} into a batch with an attention mask."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(example.get("labels", ids))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batches(examples: Sequence[dict], batch_size: int, pad_token_id: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_token_id)
