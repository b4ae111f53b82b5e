"""The inference engine: one base, many jobs' adapters, continuous batching. Greedy outputs equal
`generate` on each job's exported model (for prompt and prefix tuning: the exported model's own forward
run greedily without a cache, since peft's generate mishandles the cache of prompt learning on this
transformers), with requests of different lengths and jobs mixed in one batch and joining mid-batch."""
import queue
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cloud.infer.adapters import AdapterCache, AdapterMemoryError, build_adapter
from offsite.cloud.infer.engine import Engine, QueueFullError, Request, Sampling
from offsite.emulator import methods
from offsite.emulator.build import load_base, make_emulator
from offsite.emulator.methods import METHODS, MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.emulator.plugin import export, load_export
from offsite.errors import ConfigError, InvalidUpdateError
from tests.test_families import tiny
from tests.test_methods import _randomize, initial

PLAN = SplitPlan.uniform(6, 2, 2, 1)
TOKENS = 10


def job_adapter(make, cfg: MethodConfig, seed: int, plan: SplitPlan = PLAN):
    """A trained-looking global adapter for `cfg` on the base `make()` builds."""
    emulator = lambda: make_emulator(make(), plan)
    start = initial(emulator(), cfg, plan)
    trained, _ = methods.attach(methods.apply(emulator(), plan, cfg, start), plan, cfg)
    update = _randomize(methods.trainable_state(trained, plan, cfg), seed)
    return methods.propose(emulator(), plan, cfg, start, update) if cfg.merges else {**start, **update}


def reference(model, prompt: list[int], eos: int, cached: bool) -> list[int]:
    with torch.no_grad():
        if cached:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos)[0, len(prompt):].tolist()
            return out[:out.index(eos)] if eos in out else out
        seq, out = list(prompt), []
        for _ in range(TOKENS):
            token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            seq.append(token)
        return out


class Served:
    """An engine over `base` with `jobs` {job_id: (cfg, adapter)}."""

    def __init__(self, base, jobs, eos, budget=None, **engine_kwargs):
        self.jobs = jobs
        self.cache = AdapterCache(self._load, budget)
        self.engine = Engine(base, {eos}, self.cache, **engine_kwargs).start()
        self.base = base

    def _load(self, job_id):
        cfg, adapter, *plan = self.jobs[job_id]  # a job may bring its own plan
        return build_adapter(job_id, self.base, self.engine.router, plan[0] if plan else PLAN, cfg, adapter)

    def submit(self, model, prompt, sampling=Sampling(max_tokens=TOKENS, temperature=0), **kw):
        events: queue.Queue = queue.Queue()
        request = Request(model, prompt, sampling, events.put, **kw)
        self.engine.submit(request)
        return request, events


def collect(events, timeout=120):
    tokens = []
    while True:
        event = events.get(timeout=timeout)
        if event.finish is not None:
            return tokens, event
        tokens.append(event.token)


def prompts(n, vocab, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(2, 14, (n,), generator=g)]


@pytest.fixture(scope="module")
def every_method(tiny_model, tmp_path_factory):
    """One job per adapter method on the tiny LLaMA base, each exported and loaded back as a user would."""
    make = lambda: AutoModelForCausalLM.from_pretrained(str(tiny_model))
    jobs, exports = {}, {}
    for i, name in enumerate(METHODS):
        cfg = MethodConfig(name, r=2, virtual_tokens=4, bottleneck_dim=4)
        adapter = job_adapter(make, cfg, seed=i)
        base, tokenizer = load_base(str(tiny_model))
        plugged = methods.apply(base, PLAN, cfg, {k: v.clone() for k, v in adapter.items()}, on_emulator=False)
        exports[name] = load_export(export(plugged, tokenizer, tmp_path_factory.mktemp(name)))[0]
        jobs[name] = (cfg, adapter)
    return jobs, exports


def test_every_method_mixed_in_one_batch_equals_its_export(tiny_model, every_method):
    jobs, exports = every_method
    base, tokenizer = load_base(str(tiny_model))
    eos = tokenizer.eos_token_id
    served = Served(base, jobs, eos, max_batch=16)
    names = [None, *jobs]
    cases = [(names[i % len(names)], p) for i, p in enumerate(prompts(2 * len(names), len(tokenizer)))]
    pending = [(model, p, *served.submit(model, p)) for model, p in cases[:len(names)]]
    collect_first = pending[0][3].get(timeout=120)   # the batch is decoding: the rest join mid-batch
    pending += [(model, p, *served.submit(model, p)) for model, p in cases[len(names):]]
    for i, (model, prompt, request, events) in enumerate(pending):
        tokens, end = collect(events)
        if i == 0:
            tokens = [collect_first.token] + tokens
        ref_model = exports[model] if model else AutoModelForCausalLM.from_pretrained(str(tiny_model))
        expected = reference(ref_model, prompt, eos, cached=model not in methods.VIRTUAL)
        assert tokens == expected, f"{model}: {tokens} != {expected}"
        assert end.finish == ("length" if len(tokens) == TOKENS else "stop")
    assert len(served.cache.resident()) == len(jobs)
    served.engine.drain()


@pytest.mark.parametrize("family, names", [("gpt2", ("lora", "bottleneck", "prompt")), ("opt", ("prefix", "bitfit")),
                                           ("gpt_neox", ("prefix", "ia3")), ("qwen2", ("full", "prompt"))])
def test_families_mixed_batches_equal_their_plugged_models(family, names):
    jobs, plugged = {}, {}
    for i, name in enumerate(names):
        cfg = MethodConfig(name, r=2, virtual_tokens=4, bottleneck_dim=4)
        adapter = job_adapter(lambda: tiny(family), cfg, seed=i)
        plugged[name] = methods.apply(tiny(family), PLAN, cfg, {k: v.clone() for k, v in adapter.items()}, on_emulator=False).eval()
        jobs[name] = (cfg, adapter)
    cases = [([None, *names][i % (len(names) + 1)], p) for i, p in enumerate(prompts(8, 96, seed=3))]
    # before serving: a model built while the engine loads adapters would share the global RNG with it
    expected = [reference(plugged[m] if m else tiny(family), p, 2, cached=False) for m, p in cases]
    served = Served(tiny(family), jobs, eos=2)
    pending = [(m, served.submit(m, p)[1]) for m, p in cases]
    for (model, events), tokens in zip(pending, expected):
        assert collect(events)[0] == tokens, model
    served.engine.drain()


def test_the_batch_runs_rows_together(tiny_model, every_method):
    """Eight requests cost about as many steps as the longest one, not the sum."""
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id, max_batch=8)
    for name in list(jobs)[:8]:     # resident first: a load must not be what staggers the joins
        served.cache.release(served.cache.acquire(name))
    gate = threading.Event()
    served.engine.submit(Request(None, [5], Sampling(max_tokens=1, temperature=0), lambda e: gate.wait(5)))
    sampling = Sampling(max_tokens=TOKENS, temperature=0)
    queues = [served.submit(name, [5, 6, 7], sampling)[1] for name in list(jobs)[:8]]
    gate.set()
    for q in queues:
        collect(q)
    assert served.engine.stats.steps <= TOKENS + 2
    served.engine.drain()


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny_model, every_method):
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id)
    run = lambda s: collect(served.submit("lora", [5, 6, 7], s)[1])[0]
    assert run(Sampling(TOKENS, temperature=1.0, seed=7)) == run(Sampling(TOKENS, temperature=1.0, seed=7))
    assert run(Sampling(TOKENS, temperature=1.0, top_p=1e-6, seed=1)) == run(Sampling(TOKENS, temperature=0))
    served.engine.drain()


def test_cancel_deadline_and_a_full_queue(tiny_model, every_method):
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id, max_batch=1, max_queue=2)
    long = Sampling(max_tokens=100, temperature=0)
    first, first_events = served.submit("full", [5, 6], long)
    first_events.get(timeout=60)                           # it holds the only slot
    _, late = served.submit("lora", [5], long, deadline=time.monotonic() + 0.05)
    served.submit("lora", [7], long)
    with pytest.raises(QueueFullError):
        served.submit("lora", [8], long)
    first.cancel()                                         # the client went away: its slot frees
    assert collect(first_events)[1].finish == "cancelled"
    assert collect(late)[1].finish == "deadline"
    served.engine.drain()
    assert served.engine.stats.finished["cancelled"] == 1


def test_eviction_under_a_small_adapter_budget(tiny_model, every_method):
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    probe = Served(base, jobs, tokenizer.eos_token_id)
    one = probe._load("full").nbytes
    probe.engine.drain()
    base, _ = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id, budget=int(1.5 * one))
    for name in ("full", "bitfit", "full"):
        collect(served.submit(name, [5, 6])[1])
        assert served.cache.resident() == [name] and served.cache.resident_bytes <= 1.5 * one
    assert (served.cache.loads, served.cache.evictions) == (3, 2)
    held = served.cache.acquire("bitfit")                   # a running request holds it: it cannot go
    tokens, end = collect(served.submit("full", [5])[1])
    assert end.finish == "error" and isinstance(end.error, AdapterMemoryError)
    served.cache.release(held)
    assert collect(served.submit("full", [5])[1])[1].finish in ("length", "stop")
    served.engine.drain()


def test_prompt_and_prefix_jobs_share_the_base_blocks(tiny_model, every_method):
    """Methods that leave the blocks as they are hold no copy of them; a LoRA or AdaLoRA job holds its
    aggregate as low-rank factors on the base's linears; full, IA3 and BitFit jobs hold dense blocks."""
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id)
    for name in ("prompt", "prefix"):
        assert served._load(name).blocks == {} and served._load(name).deltas == {}
    for name in ("lora", "adalora"):
        job = served._load(name)
        assert job.blocks == {} and {b for b, _ in job.deltas} == set(PLAN.adapter_blocks)
        assert max(d.down.shape[1] for d in job.deltas.values()) <= jobs[name][0].r
        assert job.nbytes < served._load("full").nbytes / 4
    for name in ("full", "ia3", "bitfit"):
        assert set(served._load(name).blocks) == set(PLAN.adapter_blocks)
    served.engine.drain()


def test_a_request_past_the_context_fails_alone(tiny_model, every_method):
    """Virtual tokens count against the context: such a request ends with an error naming it, and the
    batch it would have joined runs on."""
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id)
    context = base.config.max_position_embeddings
    with pytest.raises(ConfigError, match="context"):
        served.submit(None, [5] * context, Sampling(max_tokens=1, temperature=0))
    _, running = served.submit("lora", [5, 6], Sampling(max_tokens=TOKENS, temperature=0))
    _, events = served.submit("prompt", [5] * (context - TOKENS), Sampling(max_tokens=TOKENS, temperature=0))
    tokens, end = collect(events)
    assert end.finish == "error" and isinstance(end.error, ConfigError) and "virtual tokens" in str(end.error)
    assert len(collect(running)[0]) == TOKENS
    served.engine.drain()


def test_an_adapter_that_does_not_fit_the_base_is_refused(tiny_model, every_method):
    jobs, _ = every_method
    base, tokenizer = load_base(str(tiny_model))
    served = Served(base, jobs, tokenizer.eos_token_id)
    cfg, adapter = jobs["full"]
    name = next(iter(adapter))
    for broken in ({**adapter, name: adapter[name][:1]}, {k: v for k, v in adapter.items() if k != name},
                   {**adapter, name.rsplit(".", 1)[0] + ".surplus": adapter[name]}):
        served.jobs["broken"] = (cfg, broken)
        tokens, end = collect(served.submit("broken", [5, 6])[1])
        assert end.finish == "error" and isinstance(end.error, InvalidUpdateError), broken.keys() - adapter.keys()
    assert collect(served.submit("full", [5, 6])[1])[1].finish in ("length", "stop")
    served.engine.drain()



@pytest.mark.parametrize("family, kinds", [("llama", ("norm", "head")), ("gpt2", ("norm", "embeddings"))])
def test_jobs_that_trained_their_norm_head_or_embeddings_are_served_row_by_row(family, kinds):
    """A job that trained beyond its blocks (llama: untied head; gpt2: its embeddings, tied to the head),
    batched with a blocks-only job and the base: each row gets its own job's norm, embeddings and head."""
    import dataclasses

    from offsite.emulator.adapter import extract_adapter, load_adapter
    from offsite.emulator.extras import extra_names
    plan = dataclasses.replace(PLAN, extras=extra_names(tiny(family), kinds))
    cfg = MethodConfig("full")
    extra = _randomize(extract_adapter(tiny(family), plan, on_emulator=False), seed=5)
    blocks = job_adapter(lambda: tiny(family), cfg, seed=1)
    plugged = {"extra": tiny(family), "blocks": tiny(family)}
    load_adapter(plugged["extra"], plan, {k: v.clone() for k, v in extra.items()}, on_emulator=False)
    load_adapter(plugged["blocks"], PLAN, {k: v.clone() for k, v in blocks.items()}, on_emulator=False)
    cases = [([None, "extra", "blocks"][i % 3], p) for i, p in enumerate(prompts(9, 96, seed=4))]
    expected = [reference(plugged[m] if m else tiny(family), p, 2, cached=False) for m, p in cases]
    served = Served(tiny(family), {"extra": (cfg, extra, plan), "blocks": (cfg, blocks)}, eos=2)
    pending = [(m, served.submit(m, p)[1]) for m, p in cases]
    for (model, events), tokens in zip(pending, expected):
        assert collect(events)[0] == tokens, model
    job = served.cache.acquire("extra")
    routed = {"model.norm", "lm_head"} if family == "llama" else {"transformer.ln_f", "transformer.wte", "lm_head"}
    assert set(job.outer) == routed  # gpt2's head is its embedding matrix: both modules route it
    served.cache.release(job)
    served.engine.drain()
