import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from instune.data.tokenize import IGNORE_INDEX
from instune.errors import UserError
from instune.eval.evaluate import EvalSet
from instune.tune.eval_data import tokenize_eval_sets

SEQ_LEN = 48


def qa(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from instune.base_model import tokenizer_training_texts
    from instune.default.tokenizer import save_tokenizer, train_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(tokenizer_training_texts(per_domain=40), vocab_size=400), directory)
    return str(directory)


def test_each_set_becomes_padded_rows_whose_targets_are_the_answers(tmp_path, tokenizer_dir):
    sets = [EvalSet("arith", "arithmetic", "in_domain", qa([("What is 2 + 3?", "5"), ("What is 4 + 4?", "8")])),
            EvalSet("units", "unit_conversion", "out_of_domain", qa([("Convert 2 km to m.", "2000 m")]))]
    files = tokenize_eval_sets(sets, tokenizer_dir, SEQ_LEN, tmp_path / "eval_data")
    assert sorted(files) == ["arith", "units"]
    table = pq.read_table(files["arith"])
    assert table.num_rows == 2 and table.column_names == ["input_ids", "labels", "position_ids"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for ids, labels in zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist()):
        assert len(ids) == len(labels) == SEQ_LEN
        targets = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
        assert targets.strip().startswith(("5", "8"))
    assert pq.read_table(files["units"]).num_rows == 1


def test_an_eval_set_may_not_take_a_training_dataset_name(tmp_path, tokenizer_dir):
    with pytest.raises(UserError, match=r"eval.sets\[validation\]: the name 'validation' is taken"):
        tokenize_eval_sets([EvalSet("validation", "d", "in_domain", qa([("q", "a")]))], tokenizer_dir, SEQ_LEN,
                           tmp_path)
