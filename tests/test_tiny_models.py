"""Every tiny model a test needs comes from the one factory, tests/tiny_models.py."""

import ast
from pathlib import Path

import transformers

from tests.tiny_models import tiny_model

TESTS = Path(__file__).resolve().parent


def test_no_test_builds_its_own_transformers_config():
    """A transformers config class (LlamaConfig, GPT2Config, ...) is constructed only in tests/tiny_models.py."""
    built = []
    for path in sorted(TESTS.glob("*.py")):
        if path.name == "tiny_models.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                found = getattr(transformers, name, None) if name.endswith("Config") else None
                if isinstance(found, type) and issubclass(found, transformers.PretrainedConfig):
                    built.append(f"{path.name}:{node.lineno} {name}")
    assert built == []


def test_a_model_of_bare_token_ids_needs_no_tokenizer_and_is_seeded():
    model = tiny_model("llama", vocab_size=48, seed=3, num_key_value_heads=4)
    assert model.config.vocab_size == 48 and model.config.num_key_value_heads == 4
    again = tiny_model("llama", vocab_size=48, seed=3, num_key_value_heads=4)
    assert all(a.equal(b) for a, b in zip(model.parameters(), again.parameters()))
    assert tiny_model("llama", vocab_size=48, attn_implementation=None).config._attn_implementation == "sdpa"
