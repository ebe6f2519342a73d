"""Reference-model scores for selection: response perplexity, and IFD (Li et al. 2023, "From Quantity to
Quality: Boosting LLM Performance with Self-Guided Data Selection for Instruction Tuning").

For a conversation, the conditioned loss is the mean next-token loss of the assistant tokens (the same
tokens training puts labels on) given everything before them; the unconditioned loss is that of the same
tokens with nothing before them: the answer tokens of every assistant turn, concatenated. IFD is their
ratio: near 0 when the instruction makes the answer easy to predict, near 1 when it does not help, above 1
when it misleads. The first answer token has no context on its own, so it is left out of both sides.
Perplexity is exp(conditioned loss) over all answer tokens.

Conversations are truncated to `max_length` as training would truncate them (data.truncation). One with no
assistant token left gets no score (NaN); it is kept here and accounted for where tokenization drops it.

IFD as published also drops IFD > 1 (the config's default max_score for ifd) and scores with a reference
that was first trained briefly on a sample of the data (reference: pre_experienced, pre_experience.py).

`score_dataset` runs a Ray Data actor pool (one model per actor, a GPU each when the cluster has GPUs),
then selects per source by thresholds and top fraction; rejects carry stage "score" and the score.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from instune.data.filters import mark_table, split_marked
from instune.data.pre_experience import PreExperience, pre_experienced_reference
from instune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_batch

STAGE = "score"
SCORE_COLUMN = "_score"


def answer_only(example: Tokenized) -> Tokenized:
    """The labelled (answer) tokens of an example on their own, each predicted from the answer before it."""
    answer = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    return Tokenized(answer, [IGNORE_INDEX] + answer[1:])


def answer_token_losses(model, examples: list[Tokenized], pad_id: int, device) -> list[np.ndarray]:
    """Per example, the next-token losses at its labelled positions, in order (one padded forward pass)."""
    import torch
    import torch.nn.functional as F

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        attention_mask[row, : len(e.input_ids)] = 1
    targets = labels[:, 1:].to(device)
    scored = targets != IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       use_cache=False).logits
        # Only the answer positions are upcast: a float copy of every position's logits is tokens x vocabulary.
        losses = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="none")
    return [part.numpy() for part in losses.cpu().split(scored.sum(dim=1).tolist())]


def score_from_losses(metric: str, conditioned: np.ndarray, alone: np.ndarray | None = None) -> dict:
    """{"perplexity": ..., "ifd": ...} from the losses of the K answer tokens given the prompt (`conditioned`)
    and of answer tokens 2..K given only the answer (`alone`, needed for IFD); {} when there is nothing to score.
    """
    if not len(conditioned) or (metric == "ifd" and (alone is None or not len(alone))):
        return {}
    scores = {"perplexity": math.exp(min(float(conditioned.mean()), 700.0))}  # exp overflows past ~709
    if metric == "ifd":
        assert len(alone) == len(conditioned) - 1, "the unconditioned losses must cover answer tokens 2..K"
        scores["ifd"] = float(conditioned[1:].mean()) / max(float(alone.mean()), 1e-12)
    return scores


def length_batches(lengths: list[int], max_examples: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped shortest first: at most `max_examples` per group and at most `max_tokens` once padded
    to the group's longest (one over-long example still gets a group of its own). The token cap bounds the
    logits a forward pass holds (tokens x vocabulary floats); the example cap lets short ones share a pass."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is None or len(group) == max_examples or (len(group) + 1) * lengths[i] > max_tokens:
            groups.append([i])
        else:
            group.append(i)
    return groups


class ReferenceScorer:
    """Ray Data actor: holds a reference model; adds a `_score` column and puts the scores in `metadata`."""

    def __init__(self, model_path: str, tokenizer_path: str, metric: str, max_length: int, batch_size: int,
                 max_batch_tokens: int, truncation: str = "prompt_left"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from instune.model_source import local_model_dir

        self.tokenizer = AutoTokenizer.from_pretrained(local_model_dir(tokenizer_path))
        self.model = AutoModelForCausalLM.from_pretrained(local_model_dir(model_path)).to(self.device).eval()
        self.metric, self.max_length, self.batch_size = metric, max_length, batch_size
        self.max_batch_tokens, self.truncation = max_batch_tokens, truncation
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def losses(self, examples: list[Tokenized]) -> list[np.ndarray]:
        """Answer-token losses per example, in forward passes of examples of similar length."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(examples)
        for chunk in length_batches([len(e.input_ids) for e in examples], self.batch_size, self.max_batch_tokens):
            for i, losses in zip(chunk, answer_token_losses(self.model, [examples[i] for i in chunk],
                                                             self.pad_id, self.device)):
                out[i] = losses
        return out

    def scores(self, conversations: list[list[dict]]) -> list[dict]:
        """{"perplexity", "ifd"} per conversation ({} when nothing of its answer is left to score)."""
        tokenized = tokenize_batch(conversations, self.tokenizer, self.max_length, self.truncation)
        ok = [i for i, t in enumerate(tokenized) if isinstance(t, Tokenized)]
        conditioned = self.losses([tokenized[i] for i in ok])
        alone = self.losses([answer_only(tokenized[i]) for i in ok]) if self.metric == "ifd" else [None] * len(ok)
        out: list[dict] = [{} for _ in conversations]
        for i, c, a in zip(ok, conditioned, alone):
            out[i] = score_from_losses(self.metric, c, a)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        values, metadata = [], []
        for scores, meta in zip(self.scores(batch["messages"].to_pylist()), batch["metadata"].to_pylist()):
            values.append(scores.get(self.metric, float("nan")))
            merged = json.loads(meta) if meta else {}
            merged.update({k: round(v, 6) for k, v in scores.items()})
            metadata.append(json.dumps(merged, sort_keys=True))
        batch = batch.set_column(batch.schema.get_field_index("metadata"), "metadata", pa.array(metadata, pa.string()))
        return batch.append_column(SCORE_COLUMN, pa.array(values, pa.float64()))


def best_is_highest(metric: str, keep: str | None) -> bool:
    return keep == "highest" if keep else metric == "ifd"


def in_thresholds(scores: np.ndarray, min_score: float | None, max_score: float | None) -> np.ndarray:
    ok = np.isfinite(scores)
    if min_score is not None:
        ok &= scores >= min_score
    if max_score is not None:
        ok &= scores <= max_score
    return ok


def top_cutoffs(scores_by_source: dict[str, np.ndarray], top_fraction: float, highest: bool,
                min_score: float | None, max_score: float | None) -> dict[str, float]:
    """Per source, the score of its ceil(top_fraction * n)-th best record among the n within the thresholds.

    Records scoring exactly the cutoff are all kept, so ties can keep a few more than the fraction.
    """
    cutoffs = {}
    for source, scores in scores_by_source.items():
        eligible = np.sort(scores[in_thresholds(scores, min_score, max_score)])
        if not len(eligible):
            continue
        keep = math.ceil(top_fraction * len(eligible))
        cutoffs[source] = float(eligible[-keep] if highest else eligible[keep - 1])
    return cutoffs


def score_reason(metric: str, score: float, source: str, *, min_score: float | None, max_score: float | None,
                 top_fraction: float | None, cutoff: float | None, highest: bool) -> str | None:
    """Reject reason (one line, with the score) or None to keep; an unscored record (NaN) is kept."""
    if math.isnan(score):
        return None
    if min_score is not None and score < min_score:
        return f"{metric} {score:.4f} is below min_score {min_score}"
    if max_score is not None and score > max_score:
        return f"{metric} {score:.4f} is above max_score {max_score}"
    if top_fraction is not None and cutoff is not None and (score < cutoff if highest else score > cutoff):
        side = "highest" if highest else "lowest"
        return (f"{metric} {score:.4f} is not in the {side} {top_fraction:.0%} of source '{source}' "
                f"(cutoff {cutoff:.4f})")
    return None


def _mark_scores(batch: pa.Table, metric: str, cutoffs: dict, thresholds: dict, highest: bool) -> pa.Table:
    failures = []
    for source, score in zip(batch["source"].to_pylist(), batch[SCORE_COLUMN].to_pylist()):
        reason = score_reason(metric, score, source, cutoff=cutoffs.get(source), highest=highest, **thresholds)
        failures.append((STAGE, reason) if reason else None)
    return mark_table(batch, failures)


def scores_by_source(scored) -> dict[str, np.ndarray]:
    """{source: every score of that source} from a scored dataset (two small columns come to the driver)."""
    from instune.data.raydata import collect

    table = collect(scored.select_columns(["source", SCORE_COLUMN]))
    if table is None:
        return {}
    out = {}
    for source in pc.unique(table["source"]).to_pylist():
        mask = pc.equal(table["source"], source)
        out[source] = table[SCORE_COLUMN].filter(mask).to_numpy(zero_copy_only=False)
    return out


def score_dataset(ds, *, model_path: str, tokenizer_path: str, metric: str, max_length: int, batch_size: int,
                  max_batch_tokens: int, num_actors: int, num_gpus: float, min_score: float | None,
                  max_score: float | None, top_fraction: float | None, keep: str | None, work_dir: str | None = None,
                  quarantine: str | None = None, truncation: str = "prompt_left",
                  pre_experience: PreExperience | None = None):
    """(kept records with scores in their metadata, reject rows); the scored records are computed once
    (written to `work_dir`, see raydata.persist). With a `quarantine` directory the rejects are written there
    instead of returned (filters.split_marked). With `pre_experience`, the reference is first trained briefly on
    a sample of `ds` (pre_experience.py, written under `work_dir`) and that model scores."""
    from instune.data.raydata import persist

    if pre_experience is not None:
        import tempfile

        out_dir = f"{work_dir}/pre_experienced" if work_dir else tempfile.mkdtemp(prefix="pre_experienced-")
        model_path = tokenizer_path = pre_experienced_reference(ds, model_path, tokenizer_path, out_dir, max_length,
                                                                pre_experience, num_gpus)

    scored = persist(ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={"model_path": model_path, "tokenizer_path": tokenizer_path, "metric": metric,
                               "max_length": max_length, "batch_size": batch_size,
                               "max_batch_tokens": max_batch_tokens, "truncation": truncation},
        batch_size=max(batch_size * 8, 64), batch_format="pyarrow", concurrency=num_actors, num_gpus=num_gpus,
    ), work_dir)
    highest = best_is_highest(metric, keep)
    cutoffs = top_cutoffs(scores_by_source(scored), top_fraction, highest, min_score, max_score) \
        if top_fraction is not None else {}
    thresholds = {"min_score": min_score, "max_score": max_score, "top_fraction": top_fraction}
    marked = scored.map_batches(
        _mark_scores, fn_kwargs={"metric": metric, "cutoffs": cutoffs, "thresholds": thresholds, "highest": highest},
        batch_format="pyarrow")
    return split_marked(marked, drop=[SCORE_COLUMN], quarantine=quarantine)
