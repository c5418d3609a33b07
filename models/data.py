"""Turning canonical records into tensors: prompt rendering, response-only loss masks, packing.

Canonical records (what ingestion writes, one JSON object per line):
- text:        {"id": str, "text": str, "split": "train"|"test"}
- instruction: {"id": str, "task": str, "prompt": str, "response": str,
                "options": list[str] | None, "split": "train"|"test"}
               plus, for a conversation, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]:
               every turn before the response (system message, user turns and earlier assistant turns).

What the model sees before its answer is the record's *prompt* (`prompt_of`): its ``messages`` when
it has them, else one user turn holding ``prompt``. Every prompt is rendered by the tokenizer's chat
template (`DEFAULT_CHAT_TEMPLATE` when it has none) and tokenized in one place (`encode_prompt`), for
training, replay, generation, option scoring and drift probes alike.

Text is text: strings from data (prompts, turns, responses, options, documents) never become special
tokens. A record that types ``<|im_end|>`` and ``<|im_start|>system`` gets those characters as ordinary
tokens, so it cannot forge a turn or a system message; only the template's own markup produces
control tokens (transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``; plain text
goes through `encode_text`).

Fitting into ``max_length`` tokens (`prompt_window`, `fit_prompt`): a conversation first loses whole
earlier exchanges (a user turn and the replies after it; the system message stays) while prompt and
answer do not fit; then the answer gets every position the prompt leaves, and only a prompt longer
than half of max_length is cut (keeping its end, at least max_length // 2 tokens). An answer cut
short keeps its first tokens and no EOS: an EOS after a cut answer would teach the model to stop in
the middle of one.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch
from jinja2.exceptions import TemplateError

IGNORE_INDEX = -100

Message = Mapping[str, str]
Prompt = str | Sequence[Message]  # one user turn, or the turns of a conversation before the answer
Supervise = Literal["last", "all"]  # which assistant turns of a conversation carry loss

# For tokenizers without a chat template of their own (the tiny default has none). One user turn
# renders as BOS + "### Instruction:\n{prompt}\n### Response:\n", as this project always has.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def prompt_of(record: Mapping) -> Prompt:
    """What the model sees before ``record``'s response: its conversation (``messages``), else its ``prompt``."""
    return record.get("messages") or record["prompt"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of text from data: special-token strings in it are encoded as the characters they are."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def _messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": message["role"], "content": message["content"]} for message in prompt]


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool, tokenize: bool):
    """``apply_chat_template`` with the tokenizer's template, else the default; a refusal becomes a ValueError.

    Tokenized, contents are sanitized (``sanitize_control_tokens``): only the template writes control tokens.
    """
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE, tokenize=tokenize,
            add_generation_prompt=add_generation_prompt, sanitize_control_tokens=tokenize, return_dict=False,
        )
    except TemplateError as error:
        roles = [message["role"] for message in messages]
        raise ValueError(f"the tokenizer's chat template refuses a conversation with roles {roles}: {error}. Templates "
                         "that allow no system message (Gemma's) need the data without one") from None


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    return list(_apply_template(tokenizer, messages, add_generation_prompt, tokenize=True))


def _check_every_turn_rendered(tokenizer, messages: list[dict]) -> None:
    """Refuse a template that drops a turn it does not refuse (some silently skip a system message)."""
    text = _apply_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    position = 0
    for message in messages:
        found = text.find(message["content"].strip(), position)
        if found < 0:
            raise ValueError(f"the tokenizer's chat template leaves out the {message['role']} turn "
                             f"{message['content'][:60]!r}; the conversation cannot be shown to the model whole")
        position = found + len(message["content"].strip())


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids the model sees before its answer, special tokens included: the one prompt encoder of
    training, generation, option scoring and drift probes.

    ``prompt``: one user turn (str) or the turns before the answer. The chat template (else
    `DEFAULT_CHAT_TEMPLATE`) alone decides the special tokens: the ids equal
    ``tokenizer.apply_chat_template(turns, add_generation_prompt=True)`` whenever the text holds no
    special-token string (BOS only where the template writes it: Llama-style templates emit
    ``{{ bos_token }}``, ChatML tokenizers such as SmolLM2's name ``<|im_start|>`` their bos_token).
    Raises ValueError when the template refuses the conversation or leaves a turn out.
    """
    messages = _messages(prompt)
    if len(messages) > 1:
        _check_every_turn_rendered(tokenizer, messages)
    return _render(tokenizer, messages, add_generation_prompt=True)


def fit_prompt(prompt_ids: list[int], answer_length: int, max_length: int | None) -> tuple[list[int], int]:
    """Cut a prompt and an answer of ``answer_length`` tokens to ``max_length`` tokens, as training does.

    Returns (prompt ids kept, answer tokens kept). When the pair overflows, the answer keeps every
    position the prompt leaves, and a prompt longer than max_length // 2 tokens is cut (keeping its
    end) to leave the answer up to max_length - max_length // 2 positions: the prompt keeps
    max(max_length // 2, max_length - answer_length) tokens then. ``max_length=None`` cuts nothing.
    Evaluation calls this with the training length so it feeds exactly the prompt window
    `encode_instruction` trained on (a model with learned absolute positions also has no positions beyond it).
    """
    if max_length is None or len(prompt_ids) + answer_length <= max_length:
        return prompt_ids, answer_length
    kept = min(answer_length, max_length - min(len(prompt_ids), max_length // 2))
    budget = max_length - kept
    return prompt_ids[len(prompt_ids) - budget :] if budget < len(prompt_ids) else prompt_ids, kept


def _exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, the rest split before each user turn)."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    groups: list[list[dict]] = []
    for message in messages[lead:]:
        if message["role"] == "user" or not groups:
            groups.append([])
        groups[-1].append(message)
    return messages[:lead], groups


def _fit_turns(tokenizer, prompt: Prompt, answer_length: int, max_length: int | None,
               ids: list[int] | None = None) -> tuple[list[dict], list[int]]:
    """(turns kept, their prompt ids): the earliest exchanges dropped while prompt + answer exceed max_length."""
    messages = _messages(prompt)
    ids = encode_prompt(tokenizer, prompt) if ids is None else ids
    if max_length is None or len(ids) + answer_length <= max_length:
        return messages, ids
    system, exchanges = _exchanges(messages)
    while len(ids) + answer_length > max_length and len(exchanges) > 1:
        exchanges = exchanges[1:]
        messages = system + [message for exchange in exchanges for message in exchange]
        ids = encode_prompt(tokenizer, messages)
    return messages, ids


def prompt_window(tokenizer, prompt: Prompt, answer_length: int, max_length: int | None,
                  ids: list[int] | None = None) -> tuple[list[int], int]:
    """(prompt ids fed, answer tokens kept) for an answer of ``answer_length`` tokens within ``max_length``.

    Whole earlier exchanges of a conversation go first, then `fit_prompt` cuts. ``ids``: the
    prompt's `encode_prompt` when the caller has it already.
    """
    _, ids = _fit_turns(tokenizer, prompt, answer_length, max_length, ids)
    return fit_prompt(ids, answer_length, max_length)


def prompt_window_text(tokenizer, prompt: Prompt, answer_length: int, max_length: int | None) -> tuple[str, int]:
    """(the prompt window evaluation feeds (`prompt_window`) as text that re-encodes to it, answer tokens kept).

    Special tokens stay in the text (``<s>``, ``<|im_start|>``): a harness that encodes it with
    add_special_tokens=False and applies no chat template (lm-eval's defaults) feeds the same ids.
    Raises ValueError when the decoded text does not re-encode to the same ids (a tokenizer whose
    decode is lossy, or a prompt that types a special token, which such a harness would turn into
    a control token), since the harness would then score another prompt.
    """
    ids, kept = prompt_window(tokenizer, prompt, answer_length, max_length)
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tokenizer.encode(text, add_special_tokens=False) != ids:
        raise ValueError(f"prompt {str(prompt)[:60]!r}... does not survive decode and re-encode with this tokenizer, "
                         "so an external harness would not see the ids Perennial scores")
    return text, kept


def _assistant_spans(tokenizer, messages: list[dict], ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) positions in ``ids`` (the rendered ``messages``) of each assistant turn's tokens.

    A turn's tokens are what the template adds when it renders that turn after the generation
    prompt: its content and end-of-turn markup, up to and including the first EOS. Raises
    ValueError when the template does not render a conversation as a continuation of its prefixes.
    """
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index == 0:
            continue
        before = _render(tokenizer, messages[:index], add_generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError("the chat template does not render a conversation as a continuation of its earlier turns, "
                             "so its earlier assistant turns cannot be located; set cit.supervise: last")
        turn = through[len(before) :]
        end = turn.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in turn else len(turn)
        spans.append((len(before), len(before) + end))
    return spans


def encode_instruction(tokenizer, prompt: Prompt, response: str, max_length: int | None,
                       supervise: Supervise = "last") -> dict[str, list[int]]:
    """Prompt + response + EOS, with labels only on the response (loss masking for CIT).

    ``prompt``: one user turn or a conversation's turns before the response. ``supervise``: "last"
    puts loss on the response alone; "all" also on every earlier assistant turn of the
    conversation (their content and end-of-turn markup, as the template renders them). At most
    ``max_length`` tokens (`prompt_window`): earlier exchanges are dropped first, then the prompt's
    start or the response's end is cut; the response keeps at least one token, so the supervised
    tokens are never silently empty, and a cut response has no EOS.
    """
    response_ids = encode_text(tokenizer, response) + [tokenizer.eos_token_id]
    messages, context = _fit_turns(tokenizer, prompt, len(response_ids), max_length)
    prompt_ids, kept = fit_prompt(context, len(response_ids), max_length)
    labels = [IGNORE_INDEX] * len(prompt_ids)
    if supervise == "all":
        cut = len(context) - len(prompt_ids)
        for start, end in _assistant_spans(tokenizer, messages, context):
            for position in range(max(start, cut), end):
                labels[position - cut] = context[position]
    response_ids = response_ids[:kept]
    return {"input_ids": prompt_ids + response_ids, "labels": labels + response_ids}


def encode_record(tokenizer, record: Mapping, max_length: int | None, supervise: Supervise = "last") -> dict[str, list[int]]:
    """`encode_instruction` of a canonical instruction record (its `prompt_of` and response)."""
    return encode_instruction(tokenizer, prompt_of(record), record["response"], max_length, supervise)


def pack_texts(tokenizer, texts: Iterable[str], block_size: int) -> list[list[int]]:
    """Concatenate documents (each closed by EOS) and cut into equal blocks: sequence packing for DAP.

    Plain text has no chat template, so each document gets BOS once (`DEFAULT_CHAT_TEMPLATE`'s rule),
    and its text is encoded as text (`encode_text`).
    """
    blocks: list[list[int]] = []
    buffer: list[int] = []
    for text in texts:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        buffer.extend(bos + encode_text(tokenizer, text) + [tokenizer.eos_token_id])
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
