"""Every config section, defined and typed once: frozen dataclasses with documented defaults.

A run's config is an ml_collections ConfigDict (files in configs/, `--config.<key>=` overrides
on the command line); `config.parse` turns it into these types at one place, and every stage
reads only the typed objects. None means "not set" (never "", 0 or -1); what None stands for is
said next to each field. Sections shared by several stages (model, mesh, data, checkpoint)
mean the same thing in each.

The reward section is `opera_jax.reward.RewardConfig` itself (its fields, minus the group size
the loop sets).
"""

from __future__ import annotations

import dataclasses
import enum

from opera_jax.enums import coerce
from opera_jax.model.attention import AttentionImpl
from opera_jax.model.lora import TARGETS as LORA_TARGETS
from opera_jax.reward.config import GUIDING_WORDS


class Stage(str, enum.Enum):
    """What `python -m opera_jax.train` runs for a config (its `stage` key)."""

    PIPELINE = "pipeline"  # warm-up → synthesis → SFT → GRPO → evaluation
    SYNTH = "synth"        # cold-start synthesis
    SFT = "sft"
    GRPO = "grpo"


class Dtype(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class OnBadRow(str, enum.Enum):
    """What a malformed data row does."""

    SKIP = "skip"    # warn (counted, summarised) and drop it
    RAISE = "raise"  # stop, naming the file and row


class Schedule(str, enum.Enum):
    """Learning rate after the linear warm-up."""

    CONSTANT = "constant"
    COSINE = "cosine"      # down to lr · final_lr_frac at the last update


class Overlong(str, enum.Enum):
    """What an SFT example longer than `seq_len` does."""

    DROP = "drop"          # skip it (warned once per source row)
    TRUNCATE = "truncate"  # keep its first seq_len tokens (the response loses its end)


class OldLogprobs(str, enum.Enum):
    """Where GRPO's π_old log-probs come from (see train/grpo.py)."""

    AUTO = "auto"            # the sampler's in float32 compute, else recompute
    SAMPLER = "sampler"      # the sampler's (no extra forward pass)
    RECOMPUTE = "recompute"  # one no-grad pass of the training weights before the update


class Aggregation(str, enum.Enum):
    """How per-token loss terms become one number."""

    TOKEN_MEAN = "token_mean"  # over every response token of the mini-batch (GRPO here, DAPO)
    SEQ_MEAN = "seq_mean"      # per-sequence mean, averaged over sequences (published micro-batches)
    # the sum over every response token / (sequences · loss.norm_constant): Dr. GRPO
    TOKEN_SUM_NORM = "token_sum_norm"


class KLEstimator(str, enum.Enum):
    """Per-token estimate of KL(π ‖ π_ref) from d = log π_ref − log π (Schulman's k1–k3)."""

    K1 = "k1"  # −d
    K2 = "k2"  # d² / 2
    K3 = "k3"  # exp(d) − d − 1, d and the result clamped (published, "low-variance")


class Ratio(str, enum.Enum):
    """The importance ratio the clipped surrogate uses."""

    TOKEN = "token"        # π / π_old per token (PPO, GRPO, DAPO)
    SEQUENCE = "sequence"  # exp(mean over the sequence's tokens of log π − log π_old) (GSPO)


@dataclasses.dataclass(frozen=True)
class Model:
    """Where the weights come from, and the dtype policy.

    Weights: `checkpoint` (an Orbax run's parameters) if set, else `hf_dir`'s safetensors, else
    random weights of `preset` drawn with `init_seed`. The architecture and tokenizer come from
    `hf_dir`, else from `preset` (with the embedded tiny tokenizer).
    """

    hf_dir: str | None = None          # a local HF directory (config.json, safetensors, tokenizer)
    preset: str | None = "tiny"        # Qwen3Config.preset name, used when hf_dir is None
    checkpoint: str | None = None      # an Orbax run dir (or its checkpoints/): initial params
    checkpoint_step: int | None = None  # its step; None = the newest readable one
    init_seed: int = 0                 # random weights of `preset`
    dtype: Dtype = Dtype.FLOAT32       # compute (activations, matmul inputs)
    param_dtype: Dtype = Dtype.FLOAT32  # master weights and optimizer moments
    remat: bool = False                # rematerialise each layer in the backward pass
    attention_impl: AttentionImpl | None = None  # None = the platform's default


class Quant(str, enum.Enum):
    """How LoRA's frozen target projections are stored (QLoRA)."""

    INT8 = "int8"
    INT4 = "int4"


@dataclasses.dataclass(frozen=True)
class Lora:
    """Low-rank adapters (model/lora.py): only the rank-r updates of the target projections
    train; the base stays frozen in the compute dtype (`model.dtype`: bf16 for a bf16 run),
    its targets optionally quantized. Checkpoints hold the adapters and their optimizer
    state; export merges them into the weights. The KL reference is the base without
    adapters (no second copy)."""

    rank: int | None = None            # None = every weight trains (no adapters)
    alpha: float = 16.0                # the update is (alpha / rank) · x·A·B
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    quantize: Quant | None = None      # the frozen targets in int8 / int4; None = model.dtype
    group_size: int | None = 128       # input elements per quantization scale; None = per channel

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.quantize is not None:
            object.__setattr__(self, "quantize", coerce(Quant, self.quantize, "lora.quantize"))
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"lora.targets must be a non-empty subset of "
                             f"{', '.join(LORA_TARGETS)}; got {', '.join(self.targets)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1 (or None), got {self.rank}")
        if self.quantize is not None and self.rank is None:
            raise ValueError("lora.quantize needs lora.rank (a quantized base is frozen)")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"lora.group_size must be >= 1 (or None), got {self.group_size}")


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The (data, fsdp, tensor) device mesh."""

    data: int = 1
    fsdp: int | None = None            # None = every device the other axes leave
    tensor: int = 1
    num_devices: int | None = None     # use the first n devices; None = all


@dataclasses.dataclass(frozen=True)
class Data:
    """The stage's input rows and how they are read (opera_jax/data/sources.py)."""

    # JSONL / Parquet / ArrayRecord files (comma-separated, globs); "hf:DIR_OR_FILES[:SPLIT]"
    # (Hugging Face datasets on disk); "tfds:NAME[/CONFIG][:SPLIT]"; or the embedded toy
    # domain "toy:<kind>:<count>" with kind sft | prompts | heldout.
    path: str = "toy:prompts:256"
    on_bad_row: OnBadRow = OnBadRow.SKIP
    seed: int = 0                      # shuffle order (reshuffled every epoch) and toy rows
    num_threads: int = 2               # tokenising threads ahead of the loop (0 = inline)
    enable_thinking: bool = True       # the chat template's thinking switch
    # Special-token strings ("<|im_end|>", "<think>") inside prompts, references and
    # thinkings are plain text by default, so a row cannot forge a turn or a think block;
    # True encodes them as the control tokens (data that means them).
    special_tokens_in_text: bool = False
    tfds_data_dir: str | None = None   # where tfds: datasets are prepared; None = $TFDS_DATA_DIR


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Orbax checkpoints of a trainer's state (always also at the last step and on SIGTERM)."""

    every: int | None = 10             # steps between saves; None = only last step / SIGTERM
    keep: int | None = 2               # newest checkpoints kept; None = all
    async_save: bool = True            # write files in the background


@dataclasses.dataclass(frozen=True)
class Log:
    """Where a trainer's metrics go besides the console, metrics.jsonl and TensorBoard
    (train/metrics.py). Weights & Biases honours its environment (WANDB_MODE=offline writes
    the run under workdir/wandb/ for `wandb sync`; WANDB_API_KEY, …)."""

    wandb_project: str | None = None   # also log to this W&B project; None = no W&B
    wandb_entity: str | None = None    # None = the account's default
    wandb_name: str | None = None      # run name; None = W&B's
    wandb_group: str | None = None     # e.g. the stages of one pipeline run


@dataclasses.dataclass(frozen=True)
class Optim:
    """AdamW after global-norm clipping, on a linear warm-up then `schedule`.

    Warm-up: lr · s / w for update s < w = round(warmup_frac · updates), as the published run
    (so the first update has lr 0); then constant, or cosine down to lr · final_lr_frac.
    """

    lr: float = 1e-3
    schedule: Schedule = Schedule.CONSTANT
    warmup_frac: float = 0.1           # of the run's optimizer updates
    final_lr_frac: float = 0.1         # cosine only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01         # matrices only (norm scales are not decayed)
    clip_norm: float | None = 1.0      # global-norm clipping; None = none


@dataclasses.dataclass(frozen=True)
class SFT:
    """The SFT loop: response-only token-mean NLL over packed [batch_size, seq_len] rows."""

    steps: int = 20
    batch_size: int = 8                # global rows per step
    seq_len: int = 256                 # T, tokens per row
    packing: bool = True               # several examples per row (first fit)
    overlong: Overlong = Overlong.DROP
    grad_accum: int = 1                # micro-batches per step (batch_size / grad_accum rows)
    chunk_size: int = 512              # log-prob chunk (positions)
    log_every: int = 1
    optim: Optim = Optim(lr=3e-3, schedule=Schedule.COSINE, b2=0.95)


@dataclasses.dataclass(frozen=True)
class Warmup(SFT):
    """The main job's stand-in for a pretrained instruct model: SFT from random weights on the
    toy domain's traces, cached by its settings' hash (pipeline.py)."""

    examples: int = 3000               # toy traces (half with the synthesis wrapper)
    cache: str = "~/.cache/opera_jax/warmup"


class _EngineChoice:
    """The `engine` / `slots` pair of a section that samples."""

    def sampler_slots(self) -> int | str | None:
        """What `Sampler.sample(slots=…)` takes: the engine's slots ("auto": chosen from the
        model and memory), or None for the fixed-batch sampler."""
        return (self.slots or "auto") if self.engine else None


@dataclasses.dataclass(frozen=True)
class Rollout(_EngineChoice):
    """What GRPO samples each RL step."""

    num_prompts: int = 8               # prompts per RL step
    n: int = 4                         # G, responses per prompt
    max_prompt_len: int = 64           # tokens after the chat template; longer prompts skipped
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0                 # 1 = off
    top_k: int | None = None           # None = off
    # The continuous-batching engine (sampling/engine.py): at most `slots` rows decode at once
    # over a paged KV cache, the rest queue; None = as many as the memory holds. engine=False
    # runs the fixed-batch sampler, `prompts_per_call` prompts per call (None = all at once).
    engine: bool = True
    slots: int | None = None
    prompts_per_call: int | None = None



@dataclasses.dataclass(frozen=True)
class Loss:
    """The GRPO loss (train/grpo_loss.py states exactly what is kept). The defaults are the
    published GRPO; the variants (README "Loss variants") are settings of these keys:
    Dr. GRPO std_normalize=False, aggregation=token_sum_norm; DAPO clip_high=0.28 with
    grpo.dynamic_sampling; GSPO ratio=sequence with small clips and no dual clip."""

    clip_low: float = 0.2
    clip_high: float = 0.2             # DAPO's clip-higher: > clip_low
    dual_clip: float | None = 3.0      # c > 1, for negative advantages; None (or inf) = off
    log_ratio_clamp: float = 20.0
    ratio: Ratio = Ratio.TOKEN
    kl_coef: float = 0.001             # weight of the KL-to-reference loss term; 0 = no KL term
    kl_estimator: KLEstimator = KLEstimator.K3
    kl_clamp: float = 10.0             # k3 only
    aggregation: Aggregation = Aggregation.TOKEN_MEAN
    norm_constant: int | None = None   # token_sum_norm's divisor; None = rollout.max_new_tokens
    std_normalize: bool = True         # advantages / group std (GRPO); False: centred only

    def __post_init__(self):
        for name, cls in (("aggregation", Aggregation), ("kl_estimator", KLEstimator),
                          ("ratio", Ratio)):
            object.__setattr__(self, name, coerce(cls, getattr(self, name), f"loss.{name}"))
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"loss.dual_clip must be > 1 (or None), got {self.dual_clip}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"loss.clip_low must be in [0, 1) and loss.clip_high >= 0, got "
                             f"{self.clip_low}, {self.clip_high}")
        if self.norm_constant is not None and self.norm_constant < 1:
            raise ValueError(f"loss.norm_constant must be >= 1 (or None), got "
                             f"{self.norm_constant}")


@dataclasses.dataclass(frozen=True)
class GRPO:
    """The GRPO loop: `num_minibatches` optimizer updates per RL step (1 PPO epoch)."""

    steps: int = 10
    num_minibatches: int = 2
    grad_accum: int = 1                # micro-batches per update
    chunk_size: int = 512              # log-prob chunk (positions)
    log_every: int = 1
    peak_flops: float | None = None    # one device's peak FLOP/s, for MFU; None = no MFU
    old_logprobs: OldLogprobs = OldLogprobs.AUTO
    # A control run: the step's rewards permuted at random across the batch before the
    # advantages (same mean and variance, no relation to the response). benchmarks/study.py.
    random_rewards: bool = False
    # DAPO's dynamic sampling: groups whose rewards are all equal (no advantage) are dropped
    # and the batch refilled from further prompts, up to max_sampling_rounds rollouts a step.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    optim: Optim = Optim(lr=1e-3, warmup_frac=0.4)


@dataclasses.dataclass(frozen=True)
class Reference:
    """The frozen model of the KL term (and the scorer with reward.scorer = reference)."""

    hf_dir: str | None = None          # both None: the policy's initial weights
    checkpoint: str | None = None      # an Orbax run's parameters (architecture from model)


@dataclasses.dataclass(frozen=True)
class Validation:
    """Held-out rollouts during GRPO, scored like training."""

    every: int | None = 5              # RL steps (also before the first, after the last); None = off
    path: str = "toy:heldout:8"        # prompt rows (data.path syntax)
    num_prompts: int = 8
    n: int = 2                         # responses per prompt (rank needs >= 2)
    temperature: float = 1.0           # 0 = greedy (then use n = 1)


@dataclasses.dataclass(frozen=True)
class Synth(_EngineChoice):
    """Cold-start synthesis (docs/METHOD.md §4)."""

    guiding_words: tuple[str, ...] = GUIDING_WORDS
    num_candidates: int = 4            # B per reflective state
    max_states: int = 20               # reflective states, then the teacher finishes
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = 20             # None = off
    max_phase_tokens: int = 64         # per thinking call
    max_candidate_tokens: int = 64     # per candidate
    max_thinking_tokens: int = 512     # then the thinking ends ("budget")
    max_answer_tokens: int = 128
    max_prompt_len: int = 512          # prompt tokens (wrapped, templated); longer: skipped
    after_think: str = "\n\n"          # after </think> in the answer context ("\n": published)
    seed: int = 0                      # with the prompt id and phase, seeds every sampler row
    teacher: str | None = None         # pipeline: an HF teacher dir; None = the start model
    teacher_name: str | None = None    # written to records; None = hf_dir or preset@seed
    # Batching: how work is packed into sampler calls (never changes a record).
    batch_prompts: int = 16            # prompts in flight
    batch_candidates: bool = True      # B candidates in one call (False: one call each)
    rows_per_call: int | None = None   # cap on rows per sampler call; None = none
    # The engine keeps each prompt's pages across its phases (prefix cache), so a phase
    # prefills only its new tokens; slots None = as many as the memory holds. engine=False:
    # the fixed-batch sampler, `compact` narrowing a call's batch as its rows finish.
    engine: bool = True
    slots: int | None = None
    compact: bool = True
    progress: bool = True              # tqdm bar


    def __post_init__(self):
        if self.num_candidates < 1 or self.batch_prompts < 1:
            raise ValueError("synth.num_candidates and synth.batch_prompts must be >= 1")


# Synth fields that only decide how work is batched or shown: they never change a record.
SYNTH_BATCHING_FIELDS = ("batch_prompts", "batch_candidates", "rows_per_call", "engine",
                         "slots", "compact", "progress")


@dataclasses.dataclass(frozen=True)
class Eval(_EngineChoice):
    """Evaluation on held-out prompts (opera_jax/evaluation)."""

    prompts: str = "toy:heldout:32"    # prompt rows (data.path syntax; benchmark fields too)
    num_prompts: int | None = None     # the first n prompts; None = all
    n: int = 2                         # responses per prompt (rank needs >= 2)
    max_new_tokens: int = 192
    max_prompt_len: int = 512
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = 20
    seed: int = 0
    scorer: str | None = None          # a source label that scores every model; None = each itself
    dtype: Dtype = Dtype.FLOAT32
    engine: bool = True                # the continuous-batching engine (as rollout.engine)
    slots: int | None = None

