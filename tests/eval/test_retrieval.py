import io

import numpy as np
import pytest
from PIL import Image

from instune.eval.retrieval import RetrievalPool, domain_gap, recalls, retrieval_by_domain, score_matrix


def test_recalls_count_ties_against_the_true_item():
    captions = ["a", "b", "c"]
    perfect = np.eye(3)
    assert recalls(perfect, captions, captions, ks=(1,)) == {"i2t_r1": 1.0, "t2i_r1": 1.0}
    assert recalls(np.zeros((3, 3)), captions, captions, ks=(1, 3)) == \
        {"i2t_r1": 0.0, "i2t_r3": 1.0, "t2i_r1": 0.0, "t2i_r3": 1.0}
    # Two images share caption "a": text->image hits when either ranks first.
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])  # images x captions ["a", "b"]
    result = recalls(scores, ["a", "a", "b"], ["a", "b"], ks=(1,))
    assert result == {"i2t_r1": pytest.approx(2 / 3), "t2i_r1": 0.5}


def test_domain_gap_is_in_domain_mean_minus_out_of_domain_mean():
    results = {"x": {"i2t_r1": 0.8, "images": 5}, "y": {"i2t_r1": 0.6, "images": 5}, "z": {"i2t_r1": 0.2, "images": 5}}
    assert domain_gap(results, ["x", "y"], ["z"]) == {"i2t_r1": pytest.approx(0.5)}


def _png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_scores_are_caption_log_likelihoods_given_the_image(tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from instune.config import VlmEmbeddedConfig
    from instune.default.vlm import ensure_embedded_vlm

    settings = VlmEmbeddedConfig(vision_hidden_size=32, hidden_size=64, num_layers=1, num_heads=2,
                                 intermediate_size=128, vocab_size=320)
    directory = ensure_embedded_vlm(tmp_path / "vlm", ["a red square", "a blue circle"], settings)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    processor = AutoProcessor.from_pretrained(directory)
    pool = RetrievalPool([_png((255, 0, 0)), _png((0, 0, 255)), _png((250, 0, 0))],
                         ["a red square", "a blue circle", "a red square"])
    scores, captions = score_matrix(model, processor, pool, batch_size=4)
    assert captions == ["a blue circle", "a red square"] and scores.shape == (3, 2)
    # One pair by hand: the mean log-probability of the caption and end-of-turn tokens.
    text = "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(images=[Image.new("RGB", (32, 32), (0, 0, 255))], text=[text + "a blue circle<|im_end|>"],
                       return_tensors="pt")
    prompt_len = processor(images=[Image.new("RGB", (32, 32))], text=[text], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**inputs).logits[0, :-1], -1)
    ids = inputs["input_ids"][0, 1:]
    expected = logprobs[torch.arange(prompt_len - 1, len(ids)), ids[prompt_len - 1:]].mean().item()
    assert scores[1, 0] == pytest.approx(expected, abs=1e-4)
    results = retrieval_by_domain(model, processor, {"colour": pool})
    assert set(results["colour"]) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "i2t_chance_r1", "i2t_chance_r5",
                                      "images", "captions"}
    assert (results["colour"]["i2t_chance_r1"], results["colour"]["i2t_chance_r5"]) == (0.5, 1.0)
    assert results["colour"]["i2t_r5"] == 1.0 and results["colour"]["images"] == 3  # 2 captions: top 5 has all
