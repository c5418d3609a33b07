"""Scoring a causal LM: greedy generation, option scoring, perplexity and output-bias drift.

Every prompt (one user turn, or a conversation's turns: `models.data.Prompt`; a record's is
`prompt_of`) goes through `models.data.prompt_window` with the training ``max_length``
(``cit.optim.max_length``), as `encode_instruction` cuts it, so evaluation sees exactly the token
sequence training saw before the response. Without ``max_length`` (or with one beyond it) the
window is the model's own context (`models.families.max_positions`), so a prompt never runs past
the positions the model has. Everything runs on the model's own device, in eval mode, without
gradients; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import inspect
import math
import re
import string
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig

from models.data import IGNORE_INDEX, Prompt, collate, encode_prompt, encode_text, pack_texts, prompt_of, prompt_window
from models.families import max_positions


# --------------------------------------------------------------------------- text metrics


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after stripping surrounding whitespace (tokenizers differ on leading spaces)."""
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over normalised words; two empty answers agree perfectly."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- helpers


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _within_context(model: torch.nn.Module, max_length: int | None) -> int | None:
    """``max_length``, never beyond the model's positions (None: the model's positions; None when it names none)."""
    positions = max_positions(model)
    if positions is None:
        return max_length
    return positions if max_length is None else min(max_length, positions)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _chunks(items: Sequence, size: int, desc: str) -> Iterator[Sequence]:
    # disable=None: the bar shows on a terminal and stays silent in logs and tests.
    for start in tqdm(range(0, len(items), size), desc=desc, disable=None, leave=False):
        yield items[start : start + size]


def _left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding keeps every prompt's last token in the final column, where generation continues."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids, attention


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Float32 logits of a right-padded batch (position ids 0.. are then correct without passing them)."""
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float()


# --------------------------------------------------------------------------- generation


def generate(
    model, tokenizer, prompts: Sequence[Prompt], max_new_tokens: int = 16, batch_size: int = 16, max_length: int | None = None
) -> list[str]:
    """Greedy continuations of the rendered prompts, cut at the first EOS, special tokens dropped.

    max_length: the training length (tokens; default and upper bound: the model's positions). Each
    prompt is cut as `encode_instruction` cuts it for an answer of ``max_new_tokens`` tokens, and
    prompt + answer never exceed max_length tokens: the answer gets what the prompt leaves, and an
    over-long prompt is cut to leave it up to max_length - max_length // 2 tokens, as in training.
    """
    device = _device(model)
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    max_length = _within_context(model, max_length)
    fitted = [prompt_window(tokenizer, prompt, max_new_tokens, max_length) for prompt in prompts]
    predictions = [""] * len(prompts)
    with _inference(model):
        # Prompts cut to leave fewer answer tokens generate apart: in a shared batch they would run past max_length.
        for new_tokens in sorted({kept for _, kept in fitted}):
            rows = [index for index, (_, kept) in enumerate(fitted) if kept == new_tokens]
            # An explicit config, so sampling or penalties in a checkpoint's generation_config never change scores.
            config = GenerationConfig(
                max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id,
                bos_token_id=tokenizer.bos_token_id,
            )
            for chunk in _chunks(rows, batch_size, "generate"):
                input_ids, attention = _left_pad([fitted[index][0] for index in chunk], pad_id)
                output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config)
                for index, row in zip(chunk, output[:, input_ids.shape[1] :].tolist()):
                    if eos_id in row:
                        row = row[: row.index(eos_id)]
                    predictions[index] = tokenizer.decode(row, skip_special_tokens=True)
    return predictions


# --------------------------------------------------------------------------- option scoring


def option_logprobs(
    model, tokenizer, pairs: Sequence[tuple[Prompt, str]], batch_size: int = 16, max_length: int | None = None
) -> list[float]:
    """For each (prompt, option): the sum of log-probs (nats, <= 0) of the option's tokens plus EOS given the rendered prompt.

    The option is tokenised on its own (as text) and followed by EOS, and with ``max_length`` (the
    training length, tokens; default and upper bound: the model's positions) the pair is cut by
    `prompt_window`, exactly as `encode_instruction` builds a training example: the score is minus
    that example's summed training loss. So options of different lengths
    under an over-long prompt each see the prompt window training would give them. Consecutive pairs
    with the same prompt window share one forward pass, the options packed after the prompt
    (`_score_shared_prompts`), so a 14-way classification runs the prompt once rather than fourteen
    times. ``batch_size`` counts prompts.
    """
    max_length = _within_context(model, max_length)
    groups: list[tuple[list[int], list[list[int]]]] = []
    previous_text, full_prompt = None, []
    for text, option in pairs:
        if text != previous_text:
            previous_text, full_prompt = text, encode_prompt(tokenizer, text)
        option_ids = encode_text(tokenizer, option) + [tokenizer.eos_token_id]
        prompt_ids, kept = prompt_window(tokenizer, text, len(option_ids), max_length, ids=full_prompt)
        if not groups or groups[-1][0] != prompt_ids:
            groups.append((prompt_ids, []))
        groups[-1][1].append(option_ids[:kept])
    packed = _packs_options(model)
    if not packed:
        groups = [(prompt, [option]) for prompt, options in groups for option in options]
    device = _device(model)
    pad_id = _pad_id(tokenizer)
    scores: list[float] = []
    with _inference(model):
        for chunk in _chunks(groups, batch_size, "options"):
            scores.extend(_score_shared_prompts(model, chunk, pad_id, device, packed))
    return scores


def _packs_options(model) -> bool:
    """Whether options can share their prompt's row: the model takes position ids (ALiBi models such as Bloom
    read positions from the 2D attention mask instead, so each of their options gets a row of its own)."""
    return "position_ids" in inspect.signature(model.forward).parameters and not getattr(model.config, "alibi", False)


def _score_shared_prompts(model, groups, pad_id: int, device: torch.device, packed: bool) -> list[float]:
    """One forward pass for a chunk of (prompt ids, [option ids]) groups: each row is a prompt followed by all
    its options, packed. A 4D mask (`_packed_attention_mask`) lets each option token attend to its prompt and to
    its own earlier tokens only, and its position id is the one it has right after the prompt, so each option
    is scored exactly as if it stood alone after the prompt. The prompt runs once, and no option copies its KV
    cache: copying (and, under grouped-query attention, expanding) one cache per option cost more than the
    model's matmuls (SmolLM2, 8 options a record: 1.4 to 2.6 times slower than this packing). ``packed``
    False (`_packs_options`): every group holds one option, under the model's own causal mask.
    """
    rows = len(groups)
    prompt_width = max(len(prompt) for prompt, _ in groups)  # prompts left-padded to end together
    width = prompt_width + max(sum(len(option) for option in options) for _, options in groups)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    # Every position may see itself, so a padding position's attention is never empty (NaN under sdpa).
    allowed = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1)
    real = torch.zeros((rows, width), dtype=torch.bool)  # not padding
    # for every option token: its row, its option, the column whose logits predict it, the token
    option_rows, option_index, predicting, tokens = [], [], [], []
    count = 0
    for row, (prompt, options) in enumerate(groups):
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width] = torch.tensor(prompt)
        positions[row, start:prompt_width] = torch.arange(len(prompt))
        real[row, start:prompt_width] = True
        allowed[row, start:prompt_width, start:prompt_width] = torch.ones(len(prompt), len(prompt), dtype=torch.bool).tril()
        column = prompt_width
        for option in options:
            end = column + len(option)
            input_ids[row, column:end] = torch.tensor(option)
            positions[row, column:end] = torch.arange(len(prompt), len(prompt) + len(option))
            real[row, column:end] = True
            allowed[row, column:end, start:prompt_width] = True
            allowed[row, column:end, column:end] = torch.ones(len(option), len(option), dtype=torch.bool).tril()
            # Token 0 of an option is predicted by the prompt's last position, token j by the option's token j-1.
            predicting.extend([prompt_width - 1, *range(column, end - 1)])
            tokens.extend(option)
            option_rows.extend([row] * len(option))
            option_index.extend([count] * len(option))
            column, count = end, count + 1
    kept = width - prompt_width + 1  # the LM head runs from the prompt's last position on only
    if packed:
        masking = dict(attention_mask=_packed_attention_mask(model, allowed, positions, device), position_ids=positions.to(device))
    else:  # one option a row: the model's own causal mask, padding masked out in 2D
        masking = dict(attention_mask=real.long().to(device))
    logits = model(input_ids=input_ids.to(device), **masking, use_cache=False, logits_to_keep=kept).logits
    offset = width - kept
    row_index = torch.tensor(option_rows, device=device)
    column_index = torch.tensor(predicting, device=device) - offset
    token_index = torch.tensor(tokens, device=device)
    picked = torch.empty(len(tokens), dtype=torch.float32, device=device)
    # log p(token) = logit - logsumexp over the vocabulary, in float32, a row at a time: a whole chunk's logits in
    # float32 would be the largest tensor of the evaluation.
    for row in range(rows):
        mine = (row_index == row).nonzero().squeeze(-1)
        if mine.numel():
            row_logits = logits[row].float()
            columns = column_index[mine]
            picked[mine] = row_logits[columns, token_index[mine]] - torch.logsumexp(row_logits[columns], dim=-1)
    return torch.zeros(count, dtype=torch.float32, device=device).index_add_(
        0, torch.tensor(option_index, device=device), picked
    ).tolist()


def _packed_attention_mask(model, allowed: torch.Tensor, positions: torch.Tensor, device: torch.device):
    """``allowed`` (rows, query, key; bool) as the 4D mask transformers passes through unchanged: bool for sdpa,
    additive float (0 or the dtype's minimum) for eager attention. A sliding window (Mistral, Gemma2) is applied
    here, by position, since a custom mask replaces the model's own: models with several layer types
    (``config.layer_types``) get a mask per type."""
    config = model.config
    dtype = next(model.parameters()).dtype

    def form(mask: torch.Tensor) -> torch.Tensor:
        mask = mask[:, None].to(device)
        if config._attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
        return mask

    window = getattr(config, "sliding_window", None)
    windowed = allowed & ((positions[:, :, None] - positions[:, None, :]) < window) if window else allowed
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return {kind: form(windowed if kind == "sliding_attention" else allowed) for kind in set(layer_types)}
    return form(windowed)


def option_scores(model, tokenizer, records: Sequence[dict], batch_size: int = 16, max_length: int | None = None) -> list[list[float]]:
    """Per record, the summed log-prob of each of its options (`option_logprobs`), in the record's option order."""
    for record in records:
        if not record.get("options"):
            raise ValueError(f"record {record.get('id')!r} has no options; use scoring='generate'")
    pairs = [(prompt_of(record), option) for record in records for option in record["options"]]
    scores = option_logprobs(model, tokenizer, pairs, batch_size, max_length)
    blocks, start = [], 0
    for record in records:
        blocks.append(scores[start : start + len(record["options"])])
        start += len(record["options"])
    return blocks


def choose_options(model, tokenizer, records: Sequence[dict], batch_size: int = 16, max_length: int | None = None) -> list[str]:
    """For each record, the option with the highest summed log-prob (first one on ties); max_length as in `option_logprobs`."""
    blocks = option_scores(model, tokenizer, records, batch_size, max_length)
    return [record["options"][max(range(len(block)), key=block.__getitem__)] for record, block in zip(records, blocks)]


def calibrated_choices(records: Sequence[dict], blocks: Sequence[Sequence[float]]) -> list[str]:
    """The options chosen once the model's label prior is removed (batch calibration, Zhou et al. 2024,
    the batch form of contextual calibration, Zhao et al. 2021).

    Each record's option log-probs are normalised over its options (log p(o | x)); the prior of an
    option is its mean probability over the records that offer it, p(o) = mean_x p(o | x); the
    calibrated choice is argmax_o log p(o | x) - log p(o). A model that answers one label to every
    record because it now prefers that label (output bias) regains the choices its scores still rank
    right; one that lost the knowledge does not.
    """
    normalised = [torch.log_softmax(torch.tensor(block, dtype=torch.float64), dim=0) for block in blocks]
    totals: dict[str, list[float]] = {}
    for record, logp in zip(records, normalised):
        for option, value in zip(record["options"], logp.exp().tolist()):
            totals.setdefault(option, []).append(value)
    log_prior = {option: math.log(max(sum(values) / len(values), 1e-300)) for option, values in totals.items()}
    chosen = []
    for record, logp in zip(records, normalised):
        adjusted = [value - log_prior[option] for option, value in zip(record["options"], logp.tolist())]
        chosen.append(record["options"][max(range(len(adjusted)), key=adjusted.__getitem__)])
    return chosen


# Wrong answers each generation-scored record is ranked against for its corrected score.
DISTRACTORS = 7


def with_distractors(records: Sequence[dict], count: int = DISTRACTORS) -> list[dict]:
    """Each record with `options`: its own response and up to ``count`` other distinct responses of the task,
    in an order fixed by content digests (so a tie never favours the right one).

    Under generation a task has no options; ranking its reference answer against other records'
    answers asks whether the model still *knows* it, whatever format it now answers in: a model
    that answers "Varnholk" but still ranks "The capital of France is Paris." first has a format bias,
    one that ranks it like any other sentence has lost the fact.
    """
    import hashlib

    def key(*parts: str) -> str:
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    answers = sorted(set(record["response"] for record in records))
    chosen = []
    for record in records:
        others = sorted((a for a in answers if a != record["response"]), key=lambda a: key(str(record.get("id")), a))[:count]
        options = sorted([record["response"], *others], key=lambda a: key(str(record.get("id")), "order", a))
        chosen.append({**record, "options": options})
    return chosen


# A task whose most frequent prediction covers at least this share of its records, more than its most frequent
# reference does, "answers one label" (output bias in its purest form), and the report says so.
ONE_LABEL_SHARE = 0.8


# --------------------------------------------------------------------------- task scoring


def score_task(
    model, tokenizer, records: Sequence[dict], scoring: str = "generate", batch_size: int = 16, max_new_tokens: int = 16,
    max_length: int | None = None,
) -> dict:
    """Score instruction records; `accuracy` is the accuracy-matrix entry.

    generate: accuracy = exact match of the greedy answer. options: accuracy = share of records
    whose highest-scoring option equals the response. Both also report normalised exact match
    and token F1 of the prediction, and the predictions themselves. Each record's prompt is its
    `prompt_of` (a conversation's turns, when it has them). max_length: the training length in tokens
    (prompts are cut as training cuts them; see `generate`, `option_logprobs`); without it, the
    model's positions.

    Output bias against lost knowledge (docs/metrics.md, "Bias or knowledge"): `corrected_accuracy`
    is the share of records whose right answer the model ranks first once its label prior is taken
    out (`calibrated_choices`): among the record's options under options scoring, among its reference
    and DISTRACTORS other answers of the task under generate (`with_distractors`), so a right answer
    in another format, or one the model still ranks first while it answers otherwise, counts. `top_prediction` and
    `top_share` are the most frequent (normalised) prediction and its share of the records;
    `reference_top_share` the same of the references; `one_label` is 1.0 when the task "answers one
    label" (ONE_LABEL_SHARE).
    """
    if not records:
        raise ValueError("score_task needs at least one record")
    references = [record["response"] for record in records]
    if scoring == "generate":
        predictions = generate(model, tokenizer, [prompt_of(record) for record in records], max_new_tokens, batch_size, max_length)
        ranked = with_distractors(records)
        calibrated = calibrated_choices(ranked, option_scores(model, tokenizer, ranked, batch_size, max_length))
    elif scoring == "options":
        blocks = option_scores(model, tokenizer, records, batch_size, max_length)
        predictions = [record["options"][max(range(len(block)), key=block.__getitem__)] for record, block in zip(records, blocks)]
        calibrated = calibrated_choices(records, blocks)
    else:
        raise ValueError(f"unknown scoring {scoring!r}; expected 'generate' or 'options'")
    corrected = sum(map(exact_match, calibrated, references)) / len(records)
    n = len(records)
    em = sum(map(exact_match, predictions, references)) / n
    top, top_count = Counter(normalize_answer(p) for p in predictions).most_common(1)[0]
    reference_share = Counter(normalize_answer(r) for r in references).most_common(1)[0][1] / n
    return {
        "accuracy": em,
        "exact_match": em,
        "normalized_exact_match": sum(map(normalized_exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "corrected_accuracy": corrected,
        "top_share": top_count / n,
        "reference_top_share": reference_share,
        "one_label": float(top_count / n >= ONE_LABEL_SHARE and top_count / n > reference_share),
        "top_prediction": top,
        "n": n,
        "predictions": predictions,
    }


# --------------------------------------------------------------------------- perplexity


def perplexity(model, tokenizer, texts: Sequence[str], block_size: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over the texts packed into blocks as DAP packs them.

    Every block is scored independently, so the first token of a block is context only; a trailing
    part shorter than a block is dropped (as in training) unless the texts fill less than one block.
    A block_size beyond the model's positions is cut to them.
    """
    blocks = pack_texts(tokenizer, texts, _within_context(model, block_size))
    if not blocks:
        raise ValueError("perplexity needs at least one non-empty text")
    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    with _inference(model):
        for chunk in _chunks([{"input_ids": block} for block in blocks], batch_size, "perplexity"):
            batch = collate(chunk, _pad_id(tokenizer))
            logits = _logits(model, batch, device)[:, :-1]
            labels = batch["labels"][:, 1:].to(device)
            total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").item()
            total_tokens += int((labels != IGNORE_INDEX).sum())
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------- output-bias drift


def next_token_distributions(model, tokenizer, prompts: Sequence[Prompt], batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
    """[len(prompts), vocab] float32 CPU tensor: P(next token | rendered prompt) for each probe.

    max_length: the training length (tokens; default and upper bound: the model's positions); a
    prompt is cut as training cuts it before a first answer token.
    """
    max_length = _within_context(model, max_length)
    examples = [{"input_ids": prompt_window(tokenizer, prompt, 1, max_length)[0]} for prompt in prompts]
    device = _device(model)
    rows: list[torch.Tensor] = []
    with _inference(model):
        for chunk in _chunks(examples, batch_size, "probe"):
            batch = collate(chunk, _pad_id(tokenizer))
            last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token of each row
            logits = _logits(model, batch, device)
            rows.append(torch.softmax(logits[torch.arange(len(chunk), device=device), last.to(device)], dim=-1).cpu())
    return torch.cat(rows)


def digit_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids of non-special tokens that decode to ASCII digits only (surrounding spaces allowed)."""
    count = min(len(tokenizer), vocab_size) if vocab_size is not None else len(tokenizer)
    special = set(tokenizer.all_special_ids)
    decoded = tokenizer.batch_decode([[i] for i in range(count)])
    return [i for i, text in enumerate(decoded) if i not in special and text.strip() and all(ch in "0123456789" for ch in text.strip())]


def output_drift(base_probs: torch.Tensor, current_probs: torch.Tensor, tokenizer, favoured_token_ids: Sequence[int] | None = None, top_k: int = 10) -> dict:
    """How the next-token distribution on fixed probe prompts moved away from the base model.

    - kl_mean / kl_max: KL(base || current) per probe (nats), averaged / worst;
    - favoured_mass_base / favoured_mass / favoured_mass_delta: mean probability on the favoured
      tokens (default: digit tokens), a direct read-out of a task's output bias leaking into
      unrelated prompts;
    - top_gainers: the top_k tokens whose mean probability grew most, decoded, with the change.
    """
    if base_probs.shape != current_probs.shape:
        raise ValueError(f"distribution shapes differ: {tuple(base_probs.shape)} vs {tuple(current_probs.shape)}")
    base = base_probs.detach().double().cpu()
    current = current_probs.detach().double().cpu()
    # Clamping keeps log(0) finite; terms with base = 0 contribute nothing either way.
    eps = 1e-12
    kl = (base * (base.clamp(min=eps).log() - current.clamp(min=eps).log())).sum(dim=1)
    if favoured_token_ids is None:
        favoured_token_ids = digit_token_ids(tokenizer, base.shape[1])
    favoured = torch.tensor(list(favoured_token_ids), dtype=torch.long)
    mass_base = base[:, favoured].sum(dim=1).mean().item() if len(favoured) else 0.0
    mass_current = current[:, favoured].sum(dim=1).mean().item() if len(favoured) else 0.0
    delta = current.mean(dim=0) - base.mean(dim=0)
    gains, ids = delta.topk(min(top_k, delta.numel()))
    top_gainers = [
        {
            "token": tokenizer.decode([i]) if i < len(tokenizer) else f"<id {i}>",
            "id": i,
            "delta": gain,
            "base": base[:, i].mean().item(),
            "current": current[:, i].mean().item(),
        }
        for i, gain in zip(ids.tolist(), gains.tolist())
    ]
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "favoured_mass_base": mass_base,
        "favoured_mass": mass_current,
        "favoured_mass_delta": mass_current - mass_base,
        "num_prompts": base.shape[0],
        "top_gainers": top_gainers,
    }
