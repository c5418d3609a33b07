"""models.evaluation on a tiny Llama trained for a few dozen steps on CPU."""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from models.data import collate, encode_instruction, encode_prompt, pack_texts
from models.evaluation import (
    choose_options,
    digit_token_ids,
    exact_match,
    generate,
    next_token_distributions,
    normalized_exact_match,
    option_logprobs,
    output_drift,
    perplexity,
    score_task,
    token_f1,
)
from tests.tiny_models import FAMILIES, tiny_model

ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack"}
SOUND_TEMPLATES = ["Which sound does the {a} make?", "The {a} says what?", "What does a {a} say?"]
SUBJECTS = ["the farmer", "a child", "my neighbour", "the teacher", "the baker", "a traveller"]
VERBS = ["walked to", "looked at", "painted", "visited", "cleaned", "found"]
OBJECTS = ["the river", "a small house", "the market", "the garden", "the station", "a quiet lake"]


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(count)]


def sound_records() -> list[dict]:
    options = list(ANIMALS.values())
    return [
        {"id": f"{a}-{k}", "task": "sounds", "prompt": t.format(a=a), "response": s, "options": options, "split": "test"}
        for a, s in ANIMALS.items()
        for k, t in enumerate(SOUND_TEMPLATES)
    ]


def arithmetic_pairs() -> list[tuple[str, str]]:
    return [(f"What is {a} plus {b}?", str(a + b)) for a in range(10) for b in range(10)]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    corpus = sentences(300, 0) + [p + " " + r for p, r in arithmetic_pairs()] + [r["prompt"] + " " + r["response"] for r in sound_records()]
    corpus += ["### Instruction:\n### Response:\n"] * 20
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    # Digits one per token, as in the project's tokenizer, so "digit tokens" are well defined.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def base(tok) -> LlamaForCausalLM:
    return tiny_model("llama", tok, attn_implementation=None, num_key_value_heads=4, max_position_embeddings=2048)


def train(model, tok, examples: list[dict], steps: int, lr: float = 1e-2, batch_size: int = 16):
    """A few AdamW steps on random mini-batches of encoded examples; returns the model in eval mode."""
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = collate(rng.choices(examples, k=batch_size), tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def finetune(base, tok, pairs: list[tuple[str, str]], steps: int = 60):
    return train(copy.deepcopy(base), tok, [encode_instruction(tok, p, r, 64) for p, r in pairs], steps)


@pytest.fixture(scope="module")
def sounds_model(base, tok):
    return finetune(base, tok, [(r["prompt"], r["response"]) for r in sound_records()], steps=100)


# --------------------------------------------------------------------------- text metrics


def test_text_metrics_on_hand_examples():
    assert exact_match(" 42\n", "42") == 1.0
    assert exact_match("The cat", "cat") == 0.0
    # lowercased, article and punctuation removed: "the cat!" -> "cat"
    assert normalized_exact_match("The Cat!", "cat") == 1.0
    assert normalized_exact_match("a dog", "cat") == 0.0
    # pred {red, fox}, ref {quick, red, fox}: common 2, P = 2/2, R = 2/3, F1 = 2*1*(2/3)/(1+2/3) = 0.8
    assert token_f1("the red fox", "quick red fox") == pytest.approx(0.8)
    # a repeated word matches only as often as the reference has it: common 1, P = 1/2, R = 1/1, F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "") == 1.0  # both normalise to nothing


# --------------------------------------------------------------------------- option scoring


def test_option_logprob_is_the_training_loss_of_that_answer(base, tok):
    prompt, option = "What does a cat say?", "meow"
    example = encode_instruction(tok, prompt, option, 64)
    supervised = sum(label != -100 for label in example["labels"]) - (example["labels"][0] != -100)
    with torch.no_grad():
        loss = base(**collate([example], tok.pad_token_id)).loss.item()
    [score] = option_logprobs(base, tok, [(prompt, option)])
    # HF's loss is the mean NLL over the supervised tokens (option + EOS), so sum = -loss * count.
    assert score == pytest.approx(-loss * supervised, rel=1e-4)


def test_option_scoring_follows_training(base, tok, sounds_model):
    records = sound_records()
    before = score_task(base, tok, records, scoring="options", batch_size=5)
    after = score_task(sounds_model, tok, records, scoring="options", batch_size=5)
    # Four options: chance is 0.25; the untrained model cannot know the mapping.
    assert before["accuracy"] <= 0.5
    assert after["accuracy"] >= 0.9
    assert after["predictions"] == choose_options(sounds_model, tok, records, batch_size=64)
    # Right padding must not change a sequence's score.
    pairs = [(r["prompt"], o) for r in records[:3] for o in r["options"]]
    assert option_logprobs(sounds_model, tok, pairs, batch_size=1) == pytest.approx(option_logprobs(sounds_model, tok, pairs, batch_size=12), abs=1e-4)


def test_option_scoring_needs_options(base, tok):
    record = dict(sound_records()[0], options=None)
    with pytest.raises(ValueError):
        score_task(base, tok, [record], scoring="options")


# --------------------------------------------------------------------------- generation


def test_generation_scores_and_stops_at_eos(base, tok, sounds_model):
    records = sound_records()
    before = score_task(base, tok, records, scoring="generate", max_new_tokens=6)
    after = score_task(sounds_model, tok, records, scoring="generate", batch_size=5, max_new_tokens=6)
    assert before["accuracy"] <= 0.25
    assert after["accuracy"] >= 0.9
    # Stopping at EOS: a correct answer is exactly the response, with nothing generated after it.
    assert sum(p == r["response"] for p, r in zip(after["predictions"], records)) >= 0.9 * len(records)
    assert after["normalized_exact_match"] >= after["exact_match"]
    assert after["token_f1"] >= after["exact_match"]


def test_generation_is_deterministic_and_batch_invariant(base, tok, sounds_model):
    prompts = [r["prompt"] for r in sound_records()]
    assert generate(base, tok, prompts, max_new_tokens=5, batch_size=4) == generate(base, tok, prompts, max_new_tokens=5, batch_size=4)
    # Left padding with the right attention mask: a prompt's answer does not depend on its batch-mates.
    one_by_one = generate(sounds_model, tok, prompts, max_new_tokens=5, batch_size=1)
    assert generate(sounds_model, tok, prompts, max_new_tokens=5, batch_size=len(prompts)) == one_by_one


def test_max_new_tokens_bounds_the_answer(base, tok):
    answer = "the farmer walked to the river"
    model = finetune(base, tok, [("Say the sentence", answer)], steps=40)
    [full] = generate(model, tok, ["Say the sentence"], max_new_tokens=30)
    [short] = generate(model, tok, ["Say the sentence"], max_new_tokens=2)
    assert full == answer
    assert full.startswith(short) and len(tok.encode(short, add_special_tokens=False)) <= 2 < len(tok.encode(full, add_special_tokens=False))


# --------------------------------------------------------------------------- perplexity


def test_perplexity_matches_loss_and_falls_with_training(base, tok):
    # One short text packs into a single block, so perplexity must be exp(HF's mean loss) on it.
    [block] = pack_texts(tok, ["the farmer walked to the river."], 64)
    with torch.no_grad():
        loss = base(**collate([{"input_ids": block}], tok.pad_token_id)).loss.item()
    assert perplexity(base, tok, ["the farmer walked to the river."], block_size=64) == pytest.approx(math.exp(loss), rel=1e-4)

    texts = sentences(60, 1)
    before = perplexity(base, tok, texts, block_size=32, batch_size=8)
    # Batching (and so padding) does not change the value.
    assert perplexity(base, tok, texts, block_size=32, batch_size=3) == pytest.approx(before, rel=1e-5)
    trained = train(copy.deepcopy(base), tok, [{"input_ids": b} for b in pack_texts(tok, texts, 32)], steps=40)
    after = perplexity(trained, tok, texts, block_size=32, batch_size=8)
    assert after < 0.5 * before


# --------------------------------------------------------------------------- drift


def test_output_drift_on_hand_distributions(tok):
    base = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    current = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    drift = output_drift(base, current, tok, favoured_token_ids=[2, 3], top_k=2)
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.25) = ln 2; the zero-probability base terms add nothing
    assert drift["kl_mean"] == pytest.approx(math.log(2))
    assert drift["favoured_mass_base"] == pytest.approx(0.0)
    assert drift["favoured_mass"] == pytest.approx(0.5)
    assert drift["favoured_mass_delta"] == pytest.approx(0.5)
    assert sorted(g["id"] for g in drift["top_gainers"]) == [2, 3]
    assert all(g["delta"] == pytest.approx(0.25) for g in drift["top_gainers"])
    assert output_drift(base, base, tok, favoured_token_ids=[2])["kl_mean"] == pytest.approx(0.0)


def test_digit_tokens(tok):
    ids = digit_token_ids(tok)
    assert {tok.decode([i]) for i in ids} == set("0123456789")


def test_drift_rises_after_narrow_digit_finetuning(base, tok, sounds_model):
    """A model tuned only on arithmetic starts answering digits to unrelated prompts; the diagnostic must see it."""
    digits_model = finetune(base, tok, arithmetic_pairs(), steps=60)
    probes = sentences(12, 99)  # general sentences, never an instruction in training
    base_probs = next_token_distributions(base, tok, probes, batch_size=5)
    assert base_probs.shape == (len(probes), base.config.vocab_size)
    assert torch.allclose(base_probs.sum(dim=1), torch.ones(len(probes)), atol=1e-4)

    unchanged = output_drift(base_probs, base_probs, tok)
    digits = output_drift(base_probs, next_token_distributions(digits_model, tok, probes), tok)
    words = output_drift(base_probs, next_token_distributions(sounds_model, tok, probes), tok)

    assert unchanged["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert unchanged["favoured_mass_delta"] == pytest.approx(0.0, abs=1e-9)
    # The digit task moves probability onto digits on non-digit prompts...
    assert digits["favoured_mass"] > digits["favoured_mass_base"] + 0.3
    assert digits["favoured_mass_delta"] > words["favoured_mass_delta"] + 0.3
    assert digits["kl_mean"] > 0.1
    # ...and the tokens that gained most are digits.
    top = [g["token"].strip() for g in digits["top_gainers"][:5]]
    assert sum(t.isdigit() for t in top) >= 3


def scores_alone(model, tok, pairs, max_length: int) -> list[float]:
    """Each (prompt, option)'s summed log-prob as minus its own training example's summed loss, one example a pass."""
    scores = []
    with torch.no_grad():
        for prompt, option in pairs:
            example = encode_instruction(tok, prompt, option, max_length)
            supervised = sum(label != -100 for label in example["labels"]) - (example["labels"][0] != -100)
            scores.append(-model(**collate([example], tok.pad_token_id)).loss.item() * supervised)
    return scores


# transformers 5.24 deprecates `past_key_values` for `cache` and removes it in 5.40: scoring must not lean on it.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_shared_prompt_option_scores_equal_full_sequence_scores(base, tok):
    # Prompts of different lengths (left padding) and different option counts in one batch.
    groups = [("What does a cat say?", ["meow", "woof", "moo"]), ("Say it", ["quack", "oink"]),
              ("A much longer prompt about which animal makes which sound on a farm?", ["moo", "meow", "baa", "woof"])]
    pairs = [(prompt, option) for prompt, options in groups for option in options]
    expected = scores_alone(base, tok, pairs, 128)
    assert option_logprobs(base, tok, pairs, batch_size=3) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert option_logprobs(base, tok, pairs, batch_size=1) == pytest.approx(expected, rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------- prompts longer than the training length (issue #17)

LONG_PROMPT = " ".join(sentences(48, 7)) + " What does a cat say?"  # about 900 tokens


def prompt_part(example: dict) -> list[int]:
    """The ids before the first supervised token of an `encode_instruction` example."""
    return example["input_ids"][: example["labels"].count(-100)]


@contextmanager
def fed_ids(model):
    """Every input_ids tensor the model's forward receives, as lists."""
    calls: list[list[list[int]]] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].tolist()), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def test_evaluation_feeds_the_prompt_window_training_saw(base, tok):
    assert len(encode_prompt(tok, LONG_PROMPT)) > 800
    trained = encode_instruction(tok, LONG_PROMPT, "meow", 64)
    answer_tokens = len(trained["input_ids"]) - len(prompt_part(trained))  # "meow" + EOS
    assert len(trained["input_ids"]) == 64

    with fed_ids(base) as calls:
        generate(base, tok, [LONG_PROMPT], max_new_tokens=answer_tokens, max_length=64)
    assert calls[0] == [prompt_part(trained)]  # the prefill pass: exactly what training put before "meow"
    assert len(calls[0][0]) + len(calls) - 1 <= 64  # one more token per later pass, never beyond max_length

    # Option scoring: each option's score is minus its training loss, prompt and option cut as training cuts them.
    options = ["meow", "quack " * 40]  # the second overflows max_length // 2 and is cut to 32 tokens
    with fed_ids(base) as calls:
        scores = option_logprobs(base, tok, [(LONG_PROMPT, option) for option in options], batch_size=1, max_length=64)
    expected = []
    for index, option in enumerate(options):
        example = encode_instruction(tok, LONG_PROMPT, option, 64)
        # batch_size=1: one pass per prompt window, the option packed right after the prompt training put before it
        assert calls[index] == [example["input_ids"]]
        with torch.no_grad():
            expected.append(-base(**collate([example], tok.pad_token_id)).loss.item() * (64 - len(prompt_part(example))))
    assert len(prompt_part(encode_instruction(tok, LONG_PROMPT, options[1], 64))) == 32
    assert scores == pytest.approx(expected, rel=1e-4)

    with fed_ids(base) as calls:
        next_token_distributions(base, tok, [LONG_PROMPT], max_length=64)
    assert calls == [[prompt_part(encode_instruction(tok, LONG_PROMPT, "", 64))]]  # room for one token: EOS


def test_learned_positions_model_scores_long_prompts_within_its_positions(tok):
    gpt2 = tiny_model("gpt2", tok, attn_implementation=None)  # 64 learned positions
    records = [
        {"id": "long", "prompt": LONG_PROMPT, "response": "meow", "options": ["meow", "woof", "quack " * 40]},
        {"id": "short", "prompt": "What does a cat say?", "response": "meow", "options": ["meow", "woof"]},
    ]
    for scoring in ("generate", "options"):
        cut = score_task(gpt2, tok, records, scoring=scoring, max_new_tokens=4, max_length=64)
        assert cut["n"] == 2
        # Without max_length (or with one past its positions) the window is the model's own 64 positions,
        # not a bare IndexError from the position table (issue #38).
        for max_length in (None, 4096):
            assert score_task(gpt2, tok, records, scoring=scoring, max_new_tokens=4, max_length=max_length) == cut
    assert perplexity(gpt2, tok, [LONG_PROMPT], block_size=128) > 0  # blocks cut to 64 positions
    # More new tokens than max_length // 2: the long prompt keeps 32 tokens and gets 32 new ones, as a training
    # example with a long answer would; the short prompt still gets all 40, whatever its batch-mates.
    with fed_ids(gpt2) as calls:
        both = generate(gpt2, tok, [LONG_PROMPT, "What does a cat say?"], max_new_tokens=40, max_length=64)
    assert max(len(ids[0]) for ids in calls if len(ids[0]) > 1) == 32
    assert both[1] == generate(gpt2, tok, ["What does a cat say?"], max_new_tokens=40, max_length=64)[0]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_option_scores_equal_each_option_alone_in_every_family(family, attn_implementation, tok):
    """Options packed after their prompt under a 4D mask score as if each stood alone after it: in every family,
    under both attention kernels, and past a sliding window (mistral, gemma2: 8 positions) and a learned
    position table (gpt2), where a mask or position mistake would show."""
    try:
        model = tiny_model(family, tok, attn_implementation=attn_implementation)
    except ValueError as error:  # gemma2, bloom: no sdpa in transformers
        pytest.skip(str(error)[:80])
    groups = [("What does a cat say?", ["meow", "woof woof woof woof", "moo"]), ("Say it", ["quack quack", "oink"]),
              ("A much longer prompt about which animal makes which sound on a farm?", ["moo", "meow", "baa", "woof"])]
    pairs = [(prompt, option) for prompt, options in groups for option in options]
    expected = scores_alone(model, tok, pairs, 64)
    assert min(len(encode_prompt(tok, prompt)) for prompt, _ in groups) > 8  # every option lies past the window
    assert option_logprobs(model, tok, pairs, batch_size=3, max_length=64) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # The control: without the window in the mask, the sliding-window families would score differently.
    if getattr(model.config, "sliding_window", None):
        model.config.sliding_window = 10_000
        assert option_logprobs(model, tok, pairs, batch_size=3, max_length=64) != pytest.approx(expected, rel=1e-3, abs=1e-3)
