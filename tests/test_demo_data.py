from perennial import demo_data


def test_generators_are_deterministic():
    assert demo_data.general_corpus(20, 3) == demo_data.general_corpus(20, 3)
    assert demo_data.general_corpus(20, 3) != demo_data.general_corpus(20, 4)
    assert demo_data.domain_corpus(10, 3) == demo_data.domain_corpus(10, 3)


def test_task_test_prompts_never_appear_in_training():
    tasks = demo_data.demo_tasks(7)
    for task in tasks.values():
        records = demo_data.task_records(task, 200, 30, 7)
        train = {r["prompt"] for r in records if r["split"] == "train"}
        test = [r for r in records if r["split"] == "test"]
        assert len(test) == 30 and train
        assert not train & {r["prompt"] for r in test}


def test_answers_are_checkable():
    tasks = demo_data.demo_tasks(7)
    for record in demo_data.task_records(tasks["arithmetic"], 50, 10, 7):
        a, b = [int(tok.strip("?.")) for tok in record["prompt"].split() if tok.strip("?.").isdigit()]
        assert record["response"] == str(a + b)
    facts = demo_data.world(7)
    for record in demo_data.task_records(tasks["fact_lookup"], 50, 10, 7):
        creature = next(c for c in demo_data.CREATURES if f" {c}" in record["prompt"])
        assert record["response"] in facts[creature]
    for record in demo_data.task_records(tasks["reverse"], 50, 10, 7):
        words = record["prompt"].split(": ", 1)[1].split()
        assert record["response"].split() == list(reversed(words))


def test_domain_corpus_states_the_fact_lookup_facts():
    facts = demo_data.world(5)
    corpus = " ".join(demo_data.domain_corpus(200, 5))
    creature, (colour, town) = next(iter(facts.items()))
    assert creature in corpus and town in corpus


def test_word_count_task_counts_words_and_is_named_for_it():
    from perennial.config import build_config

    cfg = build_config({"data": {"demo": {"heldout_tasks": ["word_count"]}}})
    assert cfg.data.demo.heldout_tasks == ["word_count"]
    assert "digit_count" not in demo_data.demo_tasks(7)
    for record in demo_data.task_records(demo_data.demo_tasks(7)["word_count"], 50, 10, 7):
        assert record["prompt"].startswith("How many words are in: ")
        assert record["response"] == str(len(record["prompt"].split(": ", 1)[1].split()))
