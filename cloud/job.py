"""A job's configuration, read from TOML and validated before anything runs; and a job as the coordinator
holds it (its configuration, what its creation built, where its rounds are)."""
from __future__ import annotations

import functools
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offsite.cloud.aggregate import make_strategy
from offsite.cloud.identity import CLIENT_NAME
from offsite.cloud.privacy import DPConfig
from offsite.cloud.robust import COMBINERS, make_combiner
from offsite.cloud.state import JobRecord
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.methods import VIRTUAL, MethodConfig
from offsite.emulator.placement import Placement
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError
from offsite.precision import parse_dtype
from offsite.tensors import TensorSpec

MAX_ROUNDS = 100_000           # the most rounds a job may have, and the largest round number the wire carries
MAX_EXAMPLES = 2**53           # the largest example count the wire carries (exact in float64)
MAX_REALIGN_STEPS = 100_000    # distillation steps of one re-alignment: hours at real size, never unbounded
MAX_PROX_MU = 100.0            # FedProx's mu: the paper tries 0.001..1; beyond 100 the proximal term is all there is
LR_SCHEDULES = ("round", "job")
WEIGHTINGS = ("examples", "equal")
SECTIONS = {"job", "split", "training", "adapter", "aggregation", "privacy", "eval", "tracking"}  # a job file's TOML tables
_AGGREGATION_KEYS = {"weighting", "max_examples_per_client", "max_weight_share"}  # [aggregation] keys that are job fields


def _looks_like_a_path(value: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else that names a place on disk is a path."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value


def _check_base_path(value: str, folder: Path) -> None:
    """A base_model meant as a folder is never tried as a hub id (minutes of retries, then a hub error that
    does not mention the folder): a missing one is named with the path it resolved to."""
    here = (folder / Path(value).expanduser()).resolve()
    if here.exists():
        return
    cwd = Path(value).expanduser().resolve()
    if cwd.exists():
        raise ConfigError(f"base_model {value!r}: {here} does not exist; {cwd} does, but a job file's relative paths are "
                          f"relative to its own folder ({folder.resolve()}): write base_model = \"{cwd}\"")
    if _looks_like_a_path(value):
        raise ConfigError(f"base_model {value!r}: no such folder {here} (relative paths are relative to the job file's "
                          f"folder, {folder.resolve()})")


@dataclass(frozen=True)
class JobConfig:
    job_id: str
    base_model: str
    rounds: int = 2
    clients_per_round: int = 1            # updates that close a round at once
    min_clients: int | None = None        # fewest updates a round may close with at its deadline (default: all)
    round_timeout_s: float = 0.0          # deadline after a round's first update; 0: wait for clients_per_round
    over_select: float = 1.0              # clients selected per round: ceil(clients_per_round * over_select) of the roster
    clients: tuple[str, ...] = ()         # the roster: names of the clients that may train this job (empty: every client)
    chat_template: str = ""               # a Jinja chat template for a base whose tokenizer has none (bundle, export, server)
    bottom: int = 2
    top: int = 2
    emulator_layers: int = 2
    train_extra: tuple[str, ...] = ()     # [split] what the adapter trains beyond its blocks: norm, head, embeddings
    epochs: float = 1.0
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 256
    pack: bool = False                    # clients pack examples into full max_length sequences
    grad_accum: int = 1                   # micro-batches per optimizer step (effective batch = batch_size x this)
    gradient_checkpointing: bool = False  # clients recompute activations in backward (QLoRA-style, for small memory)
    prox_mu: float = 0.0                  # [training] FedProx's proximal weight mu on the client; 0: plain local steps
    lr_schedule: str = "round"            # [training] round: warmup and cosine decay each round | job: one over all rounds
    report_heldout: bool = False          # [training] clients send the received adapter's loss on their held-out data
    seed: int = 0
    strategy: str = "uniform"
    quantize: str | None = None
    attn_rank: int = 0
    share_blocks: bool = False            # [split] each kept middle block runs for the dropped ones it stands for (CRaSh)
    calibration_data: str | None = None
    distill_data: str | None = None       # model owner's text for emulator distillation
    distill_steps: int = 0
    distill_lr: float = 1e-4
    realign_every: int = 0                # [split] FedBiOT: re-distill the emulator around the global adapter every k rounds
    realign_steps: int = 50               # [split] distillation steps of each re-alignment (at distill_lr)
    realign_data: str | None = None       # [split] the model owner's public text for it (default: distill_data)
    max_update_bytes: int = 1 << 30
    max_update_norm: float = 0.0          # L2 bound on a client's change to the adapter; 0: no bound
    aggregator: str = "fedavg"            # server strategy: fedavg | fedavgm | fedadam
    aggregator_params: dict[str, float] = field(default_factory=dict)   # e.g. server_lr, momentum
    combine: str = "mean"                 # how a round's updates combine: mean | median | trimmed_mean | krum | multi_krum
    combine_params: dict[str, float] = field(default_factory=dict)      # e.g. trim, byzantine, keep
    weighting: str = "examples"           # the mean's weights: examples (FedAvg) | equal
    max_examples_per_client: int = 100_000_000   # an update claiming more examples is refused
    max_weight_share: float = 0.5         # no update weighs more than this share of its round (weights are capped)
    heartbeat_s: float = 10.0             # how often a working client reports liveness
    dp_clip: float = 0.0                  # [privacy] clip: DP-FedAvg's L2 bound C on each client's change; 0: off
    dp_noise: float = 0.0                 # [privacy] noise: Gaussian noise multiplier z (std z*C on the sum)
    dp_delta: float = 1e-5                # [privacy] delta: epsilon is reported for it
    secure_aggregation: bool = False      # [privacy] secure_aggregation: the coordinator learns only the sum
    secagg_threshold: int = 0             # [privacy] threshold: t of n shares rebuild a secret; 0: n // 2 + 1
    secagg_timeout_s: float = 30.0        # [privacy] stage_timeout_s: a stage closes then with >= t clients
    method: str = "full"                  # how the adapter trains: full | lora | ia3 | bitfit
    method_params: dict = field(default_factory=dict)   # e.g. r, alpha, dropout, target_modules
    eval_sets: dict[str, str] = field(default_factory=dict)   # name -> JSONL the model owner may evaluate on
    task_sets: dict[str, str] = field(default_factory=dict)   # [eval] tasks: name -> JSONL of prompt + determined completion
    protection_data: str | None = None                        # JSONL of general (pretraining-domain) text
    export_dir: str | None = None
    device: str = "cpu"                   # where jobs create and finalization compute: cpu, cuda, cuda:N
    device_map: str | None = None         # "auto": accelerate spreads a base too big for one device over GPUs, CPU, disk
    max_memory: dict[str, str] = field(default_factory=dict)  # with device_map: e.g. {"cuda:0" = "70GiB", "cpu" = "200GiB"}
    upload_dtype: str = "auto"            # [training] dtype of clients' updates; auto: the base's
    export_dtype: str = "auto"            # [job] dtype of the exported model; auto: the base's
    tracking_logdir: str | None = None    # [tracking] logdir: TensorBoard event files in <logdir>/<job id>; None: off

    def __post_init__(self) -> None:
        if not (self.job_id and len(self.job_id) <= 64 and self.job_id.isascii()
                and self.job_id.replace("-", "").replace("_", "").isalnum()):
            raise ConfigError(f"job id must be 1 to 64 ASCII letters, digits, '-' or '_', got {self.job_id!r:.80}")
        object.__setattr__(self, "clients", tuple(self.clients))  # a TOML or JSON list
        object.__setattr__(self, "train_extra", tuple(self.train_extra))
        if self.train_extra and self.method not in ("full", "lora"):  # lora: LoRA on head and embeddings, the norm in full
            raise ConfigError(f"train_extra trains {list(self.train_extra)}: it needs method full or lora, not {self.method}")
        bad = [n for n in self.clients if not isinstance(n, str) or not CLIENT_NAME.fullmatch(n)]
        if bad or len(set(self.clients)) != len(self.clients):
            raise ConfigError(f"clients must be distinct client names ({CLIENT_NAME.pattern}), got {list(self.clients)!r:.200}")
        for name in ("rounds", "clients_per_round", "batch_size", "max_length", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"job {name} must be at least 1, got {getattr(self, name)}")
        if self.rounds > MAX_ROUNDS:
            raise ConfigError(f"job rounds must be at most {MAX_ROUNDS}, got {self.rounds}")
        if self.min_clients is not None and not 1 <= self.min_clients <= self.clients_per_round:
            raise ConfigError(f"min_clients must be in 1..clients_per_round ({self.clients_per_round}), got {self.min_clients}")
        if not 1.0 <= self.over_select <= 4.0:
            raise ConfigError(f"over_select must be in 1..4 (clients selected per round over clients_per_round), "
                              f"got {self.over_select}")
        if self.round_timeout_s < 0:
            raise ConfigError(f"round_timeout_s must be >= 0, got {self.round_timeout_s}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ConfigError(f"job epochs and lr must be positive, got {self.epochs} and {self.lr}")
        if not 0.0 <= self.prox_mu <= MAX_PROX_MU:
            raise ConfigError(f"prox_mu must be in 0..{MAX_PROX_MU:g}, got {self.prox_mu}")
        if not isinstance(self.report_heldout, bool):
            raise ConfigError(f"report_heldout must be true or false, got {self.report_heldout!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.max_update_norm < 0 or self.heartbeat_s <= 0:
            raise ConfigError(f"max_update_norm must be >= 0 and heartbeat_s > 0, got {self.max_update_norm} and {self.heartbeat_s}")
        if self.secure_aggregation and (self.clients_per_round < 2 or self.secagg_timeout_s <= 0
                                        or self.secagg_threshold and not 2 <= self.secagg_threshold <= self.clients_per_round):
            raise ConfigError("secure aggregation needs clients_per_round >= 2, stage_timeout_s > 0 and, if set, "
                              f"2 <= threshold <= clients_per_round; got {self.clients_per_round}, "
                              f"{self.secagg_timeout_s}, {self.secagg_threshold}")
        for name in ("upload_dtype", "export_dtype"):
            if getattr(self, name) != "auto":
                try:
                    parse_dtype(getattr(self, name))
                except ConfigError as e:
                    raise ConfigError(f"job {name}: {e}") from None
        if self.tracking_logdir is not None and not (isinstance(self.tracking_logdir, str) and self.tracking_logdir.strip()):
            raise ConfigError(f"[tracking] logdir must be a folder's path, got {self.tracking_logdir!r:.80}")
        self.placement(Path("."))  # validates device, device_map and max_memory
        make_strategy(self.aggregator, **self.aggregator_params)  # validates the strategy and its parameters
        self._check_weights_and_rule()
        self.method_config()
        self._check_realign()
        self.dp_config()
        self.emulator_config()  # validates the split and distillation settings

    def _check_realign(self) -> None:
        if not 0 <= self.realign_every <= self.rounds or not 1 <= self.realign_steps <= MAX_REALIGN_STEPS:
            raise ConfigError(f"realign_every must be in 0..rounds ({self.rounds}) and realign_steps in 1..{MAX_REALIGN_STEPS}, "
                              f"got {self.realign_every} and {self.realign_steps}")
        if not self.realign_every:
            return
        if not (self.realign_data or self.distill_data):
            raise ConfigError("realign_every needs realign_data (or distill_data): the public text to re-align the emulator on")
        if self.quantize or self.device_map or self.method in VIRTUAL:
            raise ConfigError("re-alignment distills the emulator's middle in full precision on one device around the "
                              "adapter's blocks: it works with neither quantize, device_map nor virtual-token methods "
                              f"(got quantize {self.quantize}, device_map {self.device_map}, method {self.method})")

    def _check_weights_and_rule(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not 1 <= self.max_examples_per_client <= MAX_EXAMPLES:
            raise ConfigError(f"max_examples_per_client must be in 1..{MAX_EXAMPLES}, got {self.max_examples_per_client}")
        if not 0 < self.max_weight_share <= 1:
            raise ConfigError(f"max_weight_share must be in (0, 1], got {self.max_weight_share}")
        if self.combine == "mean":  # the weighted mean, streamed by the coordinator; the robust rules are unweighted
            if self.combine_params:
                raise ConfigError(f"combine = 'mean' takes no parameters, got {sorted(self.combine_params)}")
            return
        rule = make_combiner(self.combine, **self.combine_params)  # validates the rule and its parameters
        if self.dp_clip or self.secure_aggregation:
            raise ConfigError(f"combine = {self.combine!r} needs every update on its own: it works with neither DP "
                              "(its noise is calibrated to the mean) nor secure aggregation (the coordinator sees only the sum)")
        fewest = self.min_clients or self.clients_per_round
        if fewest < rule.min_updates():
            raise ConfigError(f"combine = {self.combine!r} with {self.combine_params or 'its defaults'} needs at least "
                              f"{rule.min_updates()} updates per round, but a round may close with {fewest} "
                              "(min_clients, else clients_per_round)")

    def on_roster(self, client_name: str) -> bool:
        return not self.clients or client_name in self.clients

    def seats(self) -> int:
        """How many clients each round selects: clients_per_round, over-selected so that a round whose
        slowest clients vanish can still close (Bonawitz et al. 2019 select 130%)."""
        return math.ceil(self.clients_per_round * self.over_select - 1e-9)

    def method_config(self) -> MethodConfig:
        try:
            return MethodConfig(self.method, **self.method_params)
        except TypeError as e:
            raise ConfigError(f"adapter method {self.method}: {e}") from None

    def placement(self, job_dir: Path) -> Placement:
        """Where this job's base and emulator live on the coordinator; offloaded blocks go to job_dir/offload."""
        return Placement(self.device, self.device_map, dict(self.max_memory),
                         str(job_dir / "offload") if self.device_map else None)

    def resolved_dtype(self, name: str, base: torch.dtype) -> torch.dtype:
        """upload_dtype or export_dtype as a dtype: the base's (`base`) for auto."""
        value = getattr(self, name)
        return base if value == "auto" else parse_dtype(value)

    def dp_config(self) -> DPConfig:
        return DPConfig(clip=self.dp_clip, noise=self.dp_noise, delta=self.dp_delta)

    def emulator_config(self) -> EmulatorConfig:
        return EmulatorConfig(bottom=self.bottom, top=self.top, emulator_layers=self.emulator_layers,
                              strategy=self.strategy, quantize=self.quantize, attn_rank=self.attn_rank, calibration_data=self.calibration_data,
                              distill_data=self.distill_data, distill_steps=self.distill_steps,
                              distill_lr=self.distill_lr, seed=self.seed, train_extra=self.train_extra,
                              share_blocks=self.share_blocks)

    @classmethod
    def from_toml(cls, path: str | Path) -> "JobConfig":
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        unknown_sections = sorted(set(raw) - SECTIONS)
        if unknown_sections:
            raise ConfigError(f"{path}: unknown section(s) {', '.join(f'[{s}]' for s in unknown_sections)}; "
                              f"a job file has {', '.join(f'[{s}]' for s in sorted(SECTIONS))}")
        flat = {**raw.get("job", {}), **raw.get("split", {}), **raw.get("training", {}), **raw.get("eval", {})}
        if "aggregation" in raw:  # [aggregation] strategy = "fedadam", combine = "median", then their parameters
            params = dict(raw["aggregation"])
            flat["aggregator"] = params.pop("strategy", "fedavg")
            flat["combine"] = params.pop("combine", "mean")
            flat.update({k: params.pop(k) for k in _AGGREGATION_KEYS & set(params)})
            rule = COMBINERS.get(flat["combine"])
            rule_fields = set(rule.__dataclass_fields__) - {"name"} if rule else set()
            flat["combine_params"] = {k: params.pop(k) for k in rule_fields & set(params)}
            flat["aggregator_params"] = params
        if "adapter" in raw:  # [adapter] method = "lora", then the method's parameters
            params = dict(raw["adapter"])
            flat["method"] = params.pop("method", "full")
            flat["method_params"] = params
        names = {"clip": "dp_clip", "noise": "dp_noise", "delta": "dp_delta", "threshold": "secagg_threshold",
                 "stage_timeout_s": "secagg_timeout_s", "secure_aggregation": "secure_aggregation"}
        for key, value in raw.get("privacy", {}).items():
            flat[names.get(key, f"privacy.{key}")] = value
        if "tracking" in raw:  # [tracking] logdir = "runs/tensorboard"
            tracking = raw["tracking"]
            if not isinstance(tracking, dict) or not tracking.get("logdir"):
                raise ConfigError(f"{path}: [tracking] needs logdir, the folder TensorBoard's event files go to")
            for key, value in tracking.items():
                flat["tracking_logdir" if key == "logdir" else f"tracking.{key}"] = value
        if "id" in flat:
            flat["job_id"] = flat.pop("id")
        base = path.parent
        if isinstance(flat.get("base_model"), str):
            _check_base_path(flat["base_model"], base)
        for key in ("base_model", "protection_data", "export_dir", "distill_data", "calibration_data", "realign_data",
                    "tracking_logdir"):  # paths are relative to the file
            value = flat.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                if key in ("export_dir", "tracking_logdir") or (base / value).exists():  # else base_model may be a hub id
                    flat[key] = str((base / value).resolve())
        for key, field_name in (("sets", "eval_sets"), ("tasks", "task_sets")):
            if key in flat:
                flat[field_name] = {k: str((base / v).resolve()) for k, v in flat.pop(key).items()}
        unknown = set(flat) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{path}: unknown job settings {sorted(unknown)}")
        try:
            return cls(**flat)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Artifacts:
    """What a job's creation built, as the jobs table's artifacts_json holds it; the strategy state and the
    DP norms change as rounds close (see offsite.cloud.round_control)."""
    manifest: str                      # the bundle manifest's blob digest
    bundle_files: dict[str, str]       # bundle file name -> blob digest
    bundle_dir: str
    plan: SplitPlan
    spec: TensorSpec                   # the skeleton's and the method's fresh tensors: the global adapter
    update_spec: TensorSpec            # what clients upload
    upload_dtype: str
    skeleton_digest: str
    params: dict[str, int]             # "full", "emulator", "adapter"
    secagg_shapes: dict[str, list[int]] | None = None  # secure aggregation only: the tensors a masked input covers
    strategy_state: str | None = None  # the server strategy's state's blob digest, once it has one
    dp_norms: list[list[float]] | None = None  # DP only: each round's update norms before clipping
    emulator_patch: str | None = None  # re-alignment only: the newest patch of the emulator's kept middle (a blob digest)

    def blobs(self) -> set[str]:
        """The digests of every blob these artifacts name (what deleting a job must keep if another job names it)."""
        return {self.manifest, *self.bundle_files.values(), *filter(None, (self.strategy_state, self.emulator_patch))}

    def to_json(self) -> str:
        out = {"manifest": self.manifest, "bundle_files": self.bundle_files, "bundle_dir": self.bundle_dir,
               "plan": self.plan.to_dict(), "spec": self.spec, "update_spec": self.update_spec,
               "upload_dtype": self.upload_dtype, "skeleton_digest": self.skeleton_digest, "params": self.params}
        for key in ("secagg_shapes", "strategy_state", "dp_norms", "emulator_patch"):  # absent until a job has them, as before
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> "Artifacts":
        art = json.loads(text)
        return cls(art["manifest"], art["bundle_files"], art["bundle_dir"], SplitPlan.from_dict(art["plan"]), art["spec"],
                   art["update_spec"], art.get("upload_dtype", "float32"),  # older jobs: fp32
                   art["skeleton_digest"], art["params"], art.get("secagg_shapes"), art.get("strategy_state"),
                   art.get("dp_norms"), art.get("emulator_patch"))


@dataclass(frozen=True)
class Job:
    """A job as one read of the state gives it: configuration, artifacts, status and open round."""
    job_id: str
    status: str      # a key of offsite.cloud.state.JOB_TRANSITIONS
    round: int       # the open round (0-based); equals total rounds once training is over
    config: JobConfig
    artifacts: Artifacts | None  # None while the job is created: its emulator is being built

    @classmethod
    def from_record(cls, rec: JobRecord) -> "Job":
        return cls(rec.job_id, rec.status, rec.round, _config(rec.config_json),
                   None if rec.status == "created" else _artifacts(rec.artifacts_json))


# Every call reads its job; the JSON behind it changes only when a round closes. Both records are frozen,
# so one parse serves every call that reads the same text (a GetTask parsed each job's JSON twice).
_config = functools.lru_cache(maxsize=256)(JobConfig.from_json)
_artifacts = functools.lru_cache(maxsize=256)(Artifacts.from_json)
