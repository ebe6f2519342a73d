"""The embedded tokenizer: trained locally, saved as a normal HF directory, chat template round trip."""

from transformers import AutoModelForCausalLM, AutoTokenizer

from instune.base_model import tokenizer_training_texts
from instune.default.model import ensure_embedded_model
from instune.default.tokenizer import IM_END, IM_START, PAD, train_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 7 + 5?"},
    {"role": "assistant", "content": "12"},
]


def test_chat_template_round_trip(tmp_path):
    tokenizer = train_tokenizer(tokenizer_training_texts(per_domain=50), vocab_size=600)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = loaded.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (f"{IM_START}system\nAnswer briefly.{IM_END}\n{IM_START}user\nWhat is 7 + 5?{IM_END}\n"
                    f"{IM_START}assistant\n12{IM_END}\n")
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    # Special tokens are single tokens, and EOS is the end-of-turn token.
    assert loaded.convert_tokens_to_ids(IM_END) == loaded.eos_token_id
    assert loaded.convert_tokens_to_ids(PAD) == loaded.pad_token_id
    assert ids.count(loaded.convert_tokens_to_ids(IM_START)) == 3
    prompt = loaded.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith(f"{IM_START}assistant\n")


def test_unseen_text_still_tokenizes_byte_level():
    tokenizer = train_tokenizer(["only digits 1 2 3"] * 20, vocab_size=300)
    text = "Ünïcødé 日本語 😀"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_embedded_model_directory_loads_and_is_reused(tmp_path):
    settings = dict(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                    max_position_embeddings=128, seed=0)
    texts = tokenizer_training_texts(per_domain=20)
    directory = ensure_embedded_model(tmp_path / "m", texts, **settings)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    before = (directory / "model.safetensors").stat().st_mtime_ns
    ensure_embedded_model(tmp_path / "m", texts, **settings)
    assert (directory / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directories left
