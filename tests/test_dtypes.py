"""Native dtype end to end: a base stored in bf16 or fp16 stays so in the bundle, the global adapter, the
uploads and the export; half-precision weights are computed with in fp32 one layer at a time, with the
same numbers as an fp32 copy of them; memory holds the stored weights, not an fp32 copy."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from offsite import lm, precision
from offsite.cli import main as cli_main
from offsite.client.train import LocalTrainer
from offsite.cloud.blobs import BlobStore
from offsite.cloud.intake import UploadHeader
from offsite.cloud.finalize import finalize
from offsite.cloud.job import JobConfig
from offsite.demo.tiny import make_tiny_model
from offsite.emulator import methods
from offsite.emulator.build import build, load_base
from offsite.emulator.bundle import _header_dtype, describe_bundle, load_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.placement import Placement
from offsite.emulator.plugin import export, plug_in, shard_size
from offsite.errors import ConfigError
from offsite.tensors import from_bytes, spec_digest, spec_of, to_bytes
from tests.test_rounds import _sealed, make_world

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SAFETENSORS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
SHARD = 24_000  # bytes: the tiny base comes in several files, as real bases do


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def base(request, tmp_path_factory) -> tuple[Path, torch.dtype]:
    folder = tmp_path_factory.mktemp("base") / "model"
    return make_tiny_model(folder, hidden_size=64, dtype=request.param, max_shard_size=SHARD), request.param


def _file_dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return out


def test_the_bundle_and_the_skeleton_keep_the_bases_dtype(base, tmp_path):
    folder, dtype = base
    result = build(str(folder), EmulatorConfig(bottom=2, top=2, emulator_layers=1), tmp_path / "bundle", show_progress=False)
    assert result.dtype == dtype
    assert {v.dtype for v in result.skeleton.values()} == {dtype}
    assert set(_file_dtypes(tmp_path / "bundle").values()) == {SAFETENSORS[dtype]}
    base_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    bundle_bytes = sum(p.stat().st_size for p in (tmp_path / "bundle").glob("*.safetensors"))
    assert bundle_bytes < (5 / 6 + 0.03) * base_bytes  # 5 of 6 blocks (and the embeddings), at the base's width per value
    assert describe_bundle(tmp_path / "bundle")[2] == dtype  # what a client reads before it loads any weight
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    (tmp_path / "bundle" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert _header_dtype(tmp_path / "bundle") == dtype


def test_an_nf4_bundle_keeps_what_it_does_not_quantize_in_the_bases_dtype(tmp_path):
    folder = make_tiny_model(tmp_path / "base", hidden_size=64, dtype=torch.bfloat16)
    build(str(folder), EmulatorConfig(bottom=2, top=2, emulator_layers=1, quantize="nf4"), tmp_path / "bundle",
          show_progress=False)
    dtypes = _file_dtypes(tmp_path / "bundle")
    assert {d for k, d in dtypes.items() if ".layers.2." in k and k.endswith("proj.weight")} == {"U8"}  # packed middle
    assert {d for k, d in dtypes.items() if ".layers.0." in k or "embed" in k} == {"BF16"}


@pytest.mark.parametrize("per_cast", [1 << 22, 10])  # whole, or two rows (of 5 values) cast at a time
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_upcast_matmul_gives_the_gradients_of_an_fp32_copy_of_the_weights(dtype, transposed, per_cast, monkeypatch):
    monkeypatch.setattr(precision, "VALUES_PER_CAST", per_cast)
    torch.manual_seed(0)
    weight = torch.randn(6, 5).to(dtype)
    weight = weight.t().contiguous() if transposed else weight  # GPT-2's Conv1D stores in x out
    bias = torch.randn(6).to(dtype)
    x = torch.randn(3, 4, 5, requires_grad=True)
    for trains in (False, True):
        w, b = weight.clone().requires_grad_(trains), bias.clone().requires_grad_(trains)
        out = precision._UpcastMatmul.apply(x, w, b, transposed)
        w32, b32 = w.detach().float().requires_grad_(trains), b.detach().float().requires_grad_(trains)
        ref = F.linear(x, w32.t() if transposed else w32, b32)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, w, b] if trains else [x], grad)
        want = torch.autograd.grad(ref, [x, w32, b32] if trains else [x], grad)
        torch.testing.assert_close(got[0], want[0])
        for g, r in zip(got[1:], want[1:]):
            assert g.dtype == dtype
            torch.testing.assert_close(g, r.to(dtype))


def test_a_half_precision_model_computes_as_its_fp32_copy_does_and_stays_half_in_memory(base):
    folder, dtype = base
    model, _ = load_base(str(folder))
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    assert stored < 0.6 * fp32 if dtype != torch.float32 else stored == fp32
    ids = torch.randint(3, 250, (2, 16))
    # training the bottom block through the frozen rest: gradients reach it through every upcast layer
    first = model.model.layers[0].mlp.down_proj
    first_ref = reference.model.layers[0].mlp.down_proj
    precision.master_weights([first.weight])
    first_ref.weight.data = first.weight.data.clone()
    for m, w in ((model, first.weight), (reference, first_ref.weight)):
        for p in m.parameters():
            p.requires_grad_(p is w)
    out, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    torch.testing.assert_close(first.weight.grad, first_ref.weight.grad, rtol=1e-4, atol=1e-6)
    assert model.model.layers[3].mlp.down_proj.weight.dtype == dtype  # the frozen rest stays as stored


def test_the_export_has_the_bases_names_shapes_dtypes_and_shards_and_loads_in_plain_transformers(base, tmp_path):
    folder, dtype = base
    result = build(str(folder), EmulatorConfig(bottom=2, top=2, emulator_layers=1), tmp_path / "bundle", show_progress=False)
    plugged, tokenizer = plug_in(str(folder), result.plan, result.skeleton)  # an untouched adapter
    export(plugged, tokenizer, tmp_path / "export", dtype, shard_size(str(folder)))
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "export").glob("*.safetensors"))) > 1
    base_tensors, export_tensors = {}, {}
    for src, into in ((folder, base_tensors), (tmp_path / "export", export_tensors)):
        for path in src.glob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                into.update({k: f.get_tensor(k) for k in f.keys()})
    assert export_tensors.keys() == base_tensors.keys()
    for name, tensor in base_tensors.items():  # untouched adapter: the export is the base, bit for bit
        assert export_tensors[name].dtype == dtype and torch.equal(export_tensors[name], tensor), name
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert exported.dtype == dtype
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(precision.prepare(exported)(input_ids=ids).logits, plugged(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_upload_and_export_dtypes_are_checked_and_resolved(tiny_model):
    with pytest.raises(ConfigError, match="upload_dtype"):
        JobConfig(job_id="j", base_model=str(tiny_model), upload_dtype="int8")
    cfg = JobConfig(job_id="j", base_model=str(tiny_model), export_dtype="bf16")
    assert cfg.resolved_dtype("export_dtype", torch.float16) == torch.bfloat16
    assert cfg.resolved_dtype("upload_dtype", torch.float16) == torch.float16  # auto: the base's


def test_the_blob_store_holds_a_bundle_file_once(tmp_path):
    src = tmp_path / "bundle" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"weights" * 1000)
    store = BlobStore(tmp_path / "blobs")
    digest = store.put_file(src)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.open_path(digest).stat().st_ino == src.stat().st_ino  # a hard link, not a second copy
    assert store.get(digest) == src.read_bytes()


@pytest.mark.parametrize("upload_dtype, wire", [("auto", torch.bfloat16), ("float32", torch.float32)])
def test_a_lora_round_on_a_bf16_base_uploads_aggregates_and_exports_in_its_dtype(tmp_path, upload_dtype, wire):
    folder = make_tiny_model(tmp_path / "base", hidden_size=64, dtype=torch.bfloat16, max_shard_size=SHARD)
    c, _, clients, done = make_world(folder, tmp_path, rounds=1, clients_per_round=2, min_clients=2,
                                     method="lora", upload_dtype=upload_dtype)
    art = c.job("j").artifacts
    assert art.upload_dtype == str(wire).removeprefix("torch.")
    assert {d for _, d in art.update_spec.values()} == {str(wire).removeprefix("torch.")}
    start = from_bytes(c.blobs.get(c.state.global_adapters("j")[0]))
    assert {v.dtype for v in start.values()} == {torch.bfloat16}
    trainer = LocalTrainer(Path(art.bundle_dir), ["home 2 away 1 home win"] * 16, None, max_length=32)
    train_cfg = lm.TrainConfig(epochs=1, batch_size=8, warmup_steps=1)
    selected = [cl for cl in clients if cl[0].client_id in c.state.round("j", 0).selected]  # 2 of the 3
    for (client, signer), seed in zip(selected, (1, 2)):
        result = trainer.train_round(start, spec_digest(spec_of(start)), lm.TrainConfig(**{**train_cfg.__dict__, "seed": seed}),
                                     methods.MethodConfig("lora"), show_progress=False, upload_dtype=wire)
        payload = to_bytes(result.update)
        envelope = _sealed(c, client, signer, 0, payload)
        c.submit_update(client, UploadHeader("j", 0, 16, len(envelope), hashlib.sha256(envelope).hexdigest(), None), envelope)
        frozen = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        assert frozen.data_ptr() == start["model.layers.0.self_attn.q_proj.weight"].data_ptr()  # held once, not copied
    c.tick()  # the round worker's step
    assert done == ["j"]
    job = c.job("j")
    new = from_bytes(c.blobs.get(c.state.global_adapters("j")[1]))
    assert {v.dtype for v in new.values()} == {torch.bfloat16}
    assert any(not torch.equal(new[k], start[k]) for k in new)
    report = finalize(job.config, job.artifacts, c.state, c.blobs, c.layout.jobs / "j", log=lambda *_: None)
    export_dir = Path(report["export_dir"])
    assert set(_file_dtypes(export_dir).values()) == {"BF16"}
    assert len(json.loads((export_dir / "model.safetensors.index.json").read_text())["weight_map"]) == len(_file_dtypes(folder))

    # `offsite cloud export`, both formats: merged is the finalized export again; peft, on the plain base, its logits
    state = str(c.layout.root)
    assert cli_main(["cloud", "export", "--state", state, "--job", "j", "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    assert _file_dtypes(tmp_path / "m") == _file_dtypes(export_dir)
    assert cli_main(["cloud", "export", "--state", state, "--job", "j", "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["r"] == 8 * 2  # r x the 2 updates merged
    assert set(_file_dtypes(tmp_path / "p").values()) == {"BF16"}
    from peft import PeftModel
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(export_dir)).float()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(folder)).float()
        got = PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(str(folder)).float()(input_ids=ids).logits
    assert (got - want).abs().max() < 0.1 * (want - untouched).abs().max()  # bf16 rounding apart, the same change


def test_placement_is_checked():
    for bad in ({"device": "gpu"}, {"device_map": "everywhere"}, {"device_map": "auto", "max_memory": {"cpu": "lots"}}):
        with pytest.raises(ConfigError):
            Placement(**bad)
    assert Placement("cuda:1").load_kwargs("unused") == {"device_map": {"": "cuda:1"}}


def test_a_base_placed_over_cpu_and_disk_evaluates_plugs_in_and_exports_as_one_in_memory(tmp_path):
    folder = make_tiny_model(tmp_path / "base", hidden_size=64, dtype=torch.bfloat16)
    resident = ("model.layers.0", "model.layers.5")
    placed, tokenizer = load_base(str(folder), Placement(device_map="auto", max_memory={"cpu": "150KB"},
                                                          offload_folder=str(tmp_path / "offload")), resident)
    assert "disk" in placed.hf_device_map.values()
    assert all(placed.hf_device_map.get(name) == "cpu" for name in resident)  # written into: never on disk
    whole, _ = load_base(str(folder))
    texts = lm.encode(tokenizer, ["home 2 away 1 home win", "away 0 home 3 home win"] * 4, 32)
    assert lm.mean_token_loss(placed, texts, tokenizer.pad_token_id) == lm.mean_token_loss(whole, texts, tokenizer.pad_token_id)
    with torch.no_grad():
        for model in (placed, whole):
            for p in model.model.layers[5].parameters():
                p.add_(0.01)
    for model, out in ((placed, "a"), (whole, "b")):
        export(model, tokenizer, tmp_path / out, torch.bfloat16)
    a, b = _file_tensors(tmp_path / "a"), _file_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="offloaded"):
        export(placed, tokenizer, tmp_path / "c", torch.float32)


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_a_bundle_built_from_a_base_placed_over_cpu_and_disk_equals_one_built_in_memory(tmp_path):
    folder = make_tiny_model(tmp_path / "base", hidden_size=64, dtype=torch.bfloat16)
    cfg = EmulatorConfig(bottom=2, top=2, emulator_layers=1)
    placed = Placement(device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path / "offload"))
    a = build(str(folder), cfg, tmp_path / "a", show_progress=False, placement=placed)
    b = build(str(folder), cfg, tmp_path / "b", show_progress=False)
    assert "disk" in load_base(str(folder), placed)[0].hf_device_map.values()  # the placement did put blocks on disk
    ta, tb = _file_tensors(tmp_path / "a"), _file_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.skeleton.keys() == b.skeleton.keys() and all(torch.equal(a.skeleton[k], b.skeleton[k]) for k in a.skeleton)
