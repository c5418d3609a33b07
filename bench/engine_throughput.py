"""Training throughput and memory of Perennial's engine on SmolLM2-135M-Instruct (the embedded default) beside a
plain PyTorch loop and transformers.Trainer, on the CPU.

    python -m bench.engine_throughput [--steps 8] [--warmup 2] [--rounds 2] [--rss-steps 3] [--threads 2] [--quick]
    python -m bench.engine_throughput --activation-checkpointing [--models smollm2 llama-1b] [--tunings ...] [--quick]

Each run is a fresh process (glibc's allocator defaults, as a user's process would have): the engine, the plain loop
and Trainer in bf16 autocast and fp32, and the engine with `optim.fused_adamw`, in rotated rounds, then once each the
other variants of RUNS; then peak memory per tuning method and per CL method (its second task). Tokens/s at the median
step after the warm-up steps, and the milliseconds of its optimizer step (`optimizer_seconds`); memory: the Linux
high-water mark above the resident size before the model is built. How close to the limit: in each round a fresh
process times, with the same threads, every GEMM a training step runs through SmolLM2's Linear layers alone
(torch.matmul, bf16 and fp32, `gemm_rates`); the engine's model FLOP/s are reported as a fraction of the fastest (the
peak) and of the step's mix; one more process profiles one engine step by op (`profile_child`, `op_category`).
Results: bench/results/engine_throughput.json and .md; `python -m bench.report --render` rewrites the .md.
Model FLOPs per token (`flops_per_token`): N counts the weights of every nn.Linear (q, k, v, o, gate, up, down and the
head; a head tied to the embedding is one Linear and counts once, the embedding lookup is no matmul), N_trained those
that train: 2·N forward, 2·N for the input gradients, 2·N_trained for the weight gradients, so 6·N for full
fine-tuning; plus attention, 12·layers·seq·d with d = heads × head dim: the scores Q·Kᵀ and the values A·V take
2·seq·d each per token and layer forward, three times that with backward, the causal mask not halved (PaLM's
convention; eager attention computes the whole seq × seq matrix). Norms, activations, rotary, loss and optimizer
count nothing. SmolLM2 at 96 tokens a block: N = 134,479,872, 6·N = 0.807 GFLOP and attention 0.020 GFLOP a token.
--activation-checkpointing: only the peak memory and tokens/s with `optim.activation_checkpointing` off and on, per
model of CKPT_MODELS (SmolLM2: full and attn-proj; llama-1b, TinyLlama-1.1B's shape with random weights: attn-proj, as
full fine-tuning's fp32 weights, gradients and AdamW state alone are 17.6 GB; `--tunings` for others);
bench/results/engine_activation_checkpointing.json and .md, published below the engine's section. --quick: 3 steps on
2 blocks of 32 tokens, the 1B shape replaced by the factory's tiny Llama (a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, ROOT, child, report_head, section_head, table, write_results
from models.allocator import freed_memory_kept
from models.data import collate, encode_instruction, pack_texts
from models.engine import precision_context, stream_indices, train
from models.loading import load_model_and_tokenizer
from models.tuning import apply_tuning, count_parameters
from perennial.config import OptimConfig, TuningConfig
from tasks.compare import _peak_rss_kib, _reset_peak_rss  # the peak-RSS readings `perennial compare` takes

MODULE = "bench.engine_throughput"
CACHE = ROOT / ".perennial" / "cache" / "gguf"
MODEL = "smollm2-135m-instruct"
SEED = 0


@dataclass(frozen=True)
class LoopSettings:
    """What every loop of one benchmark shares: `batch` blocks of `block` tokens a step, AdamW at a constant `lr`."""

    batch: int
    block: int
    lr: float
    seed: int = SEED
    device: str = "cpu"

    def optim_config(self, steps: int, **settings) -> OptimConfig:
        # No warm-up and a constant rate: the plain loop and Trainer have no schedule either.
        return OptimConfig(lr=self.lr, batch_size=self.batch, max_steps=steps, warmup_steps=0, schedule="constant",
                           max_length=self.block, log_every=10**6, **settings)


def minor_faults() -> int:
    """This process's minor page faults so far: each first touch of a page the heap did not keep (models/allocator.py)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time), taken after every optimizer step."""
    return time.perf_counter(), time.process_time()


def throughput(stamps: list[tuple[float, float]], warmup: int, settings: LoopSettings) -> dict[str, float]:
    """Tokens/s at the median step after `warmup` steps (a stalled step does not move a median), per wall-second
    and per CPU-second of this process."""
    after = stamps[warmup - 1 :]
    tokens = settings.batch * settings.block
    return {clock: tokens / statistics.median(b[index] - a[index] for a, b in zip(after, after[1:]))
            for index, clock in enumerate(("wall", "cpu"))}


def engine_loop(settings: LoopSettings, precision: str = "fp32", compiled: str | None = None, fused_adamw: bool = False):
    """Perennial's engine (`models.engine.train`), its bookkeeping included; `compiled`: the model's forward under
    torch.compile with this backend (`nn.Module.compile`); `fused_adamw`: `optim.fused_adamw`."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        stamps = []
        if compiled:
            model.compile(backend=compiled)
        train(model, examples, settings.optim_config(steps, fused_adamw=fused_adamw), seed=settings.seed, pad_token_id=pad_token_id,
              device=torch.device(settings.device), precision=precision, on_step_end=lambda step, _model: stamps.append(clock()))
        return stamps

    return run


def plain_loop(settings: LoopSettings, precision: str = "fp32", compiled: str | None = None, bf16_weights: bool = False):
    """The least a loop can do: the engine's batches (`stream_indices`) pre-stacked, forward (autocast for bf16),
    backward, AdamW step. `bf16_weights`: bf16 weights and activations throughout (no autocast casts), AdamW on fp32
    master copies."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        device = torch.device(settings.device)
        params = [p for p in model.to(device).parameters() if p.requires_grad]
        masters = [p.detach().float().clone().requires_grad_(True) for p in params] if bf16_weights else params
        (model.to(torch.bfloat16) if bf16_weights else model).train()
        optimizer = torch.optim.AdamW(masters, lr=settings.lr)
        forward = torch.compile(model, backend=compiled) if compiled else model
        data = torch.tensor([example["input_ids"] for example in examples], device=device)
        order = torch.tensor(stream_indices(len(examples), settings.seed, 0, steps * settings.batch)).view(steps, settings.batch)
        stamps = []
        for ids in data[order]:
            with precision_context(precision, device):
                loss = forward(input_ids=ids, labels=ids).loss
            loss.backward()
            if bf16_weights:
                for master, param in zip(masters, params):
                    master.grad, param.grad = param.grad.float(), None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if bf16_weights:
                with torch.no_grad():
                    for master, param in zip(masters, params):
                        param.copy_(master)
            stamps.append(clock())
        return stamps

    return run


def trainer_loop(settings: LoopSettings, precision: str = "fp32", keep_freed_memory: bool = False):
    """transformers.Trainer with the engine's optimizer (`adamw_torch`; Trainer's default is the fused variant),
    clipping and constant rate; `keep_freed_memory` runs it under the engine's heap setting."""

    def run(model, examples, pad_token_id, steps, clock=stamp):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        stamps = []
        callback = type("Stamps", (TrainerCallback,), {"on_step_end": lambda self, *args, **kwargs: stamps.append(clock())})
        dataset = [{key: value[0] for key, value in collate([example], pad_token_id).items()} for example in examples]
        with tempfile.TemporaryDirectory() as output_dir:
            args = TrainingArguments(
                output_dir=output_dir, per_device_train_batch_size=settings.batch, max_steps=steps,
                learning_rate=settings.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", bf16=precision == "bf16", eval_strategy="no",
                save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
                dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=settings.device == "cpu", seed=settings.seed,
            )
            with freed_memory_kept() if keep_freed_memory else contextlib.nullcontext():
                Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback()]).train()
        return stamps

    return run


REAL = LoopSettings(batch=8, block=96, lr=5e-5)
CKPT = LoopSettings(batch=4, block=512, lr=5e-5)  # long enough blocks that the activations (eager attention) weigh
# --activation-checkpointing: model -> (its blocks, the tuning methods it measures). llama-1b, TinyLlama-1.1B's shape with
# random weights, at one block: attn-proj peaks near 10.4 GiB without checkpointing, 7.1 GiB with it (extrapolated from
# its shape cut to 2 and 4 layers); full fine-tuning's fp32 weights, gradients and AdamW state alone are 17.6 GB.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
CKPT_MODELS = {"smollm2": (CKPT, ["full", "attn-proj"]), "llama-1b": (LoopSettings(batch=1, block=512, lr=5e-5), ["attn-proj"])}
QUICK_CKPT = LoopSettings(batch=2, block=32, lr=5e-5)
# name -> (tuning method, loop); the first seven are the rotated side-by-side comparison, the others run once
RUNS = {
    "engine bf16": ("full", engine_loop(REAL, "bf16")),
    "engine fp32": ("full", engine_loop(REAL, "fp32")),
    "plain bf16": ("full", plain_loop(REAL, "bf16")),
    "plain fp32": ("full", plain_loop(REAL, "fp32")),
    "trainer bf16": ("full", trainer_loop(REAL, "bf16")),
    "trainer fp32": ("full", trainer_loop(REAL, "fp32")),
    "engine bf16 fused AdamW": ("full", engine_loop(REAL, "bf16", fused_adamw=True)),
    "engine attn-proj bf16": ("attn-proj", engine_loop(REAL, "bf16")),
    "engine attn-proj fp32": ("attn-proj", engine_loop(REAL, "fp32")),
    "plain bf16 weights + fp32 master": ("full", plain_loop(REAL, bf16_weights=True)),
    "plain bf16 + torch.compile": ("full", plain_loop(REAL, "bf16", compiled="inductor")),
    "engine bf16 + torch.compile": ("full", engine_loop(REAL, "bf16", compiled="inductor")),
    "trainer bf16, freed memory kept": ("full", trainer_loop(REAL, "bf16", keep_freed_memory=True)),
    "engine fp32 fused AdamW": ("full", engine_loop(REAL, "fp32", fused_adamw=True)),
}
ROTATED = list(RUNS)[:7]
# the memory runs (kind, methods), and those of --quick
MEMORY = [("tuning", ["full", "lora", "mora", "attn-proj", "mlp-gate-up", "osf"]), ("cl", ["ewc", "lwf", "seekr", "olora", "averaging"])]
QUICK_MEMORY = [("tuning", ["full", "attn-proj"]), ("cl", ["lwf"])]
# what each ratio (of tokens per wall-second) divides by what; the targets
RATIOS = {
    "engine bf16 / engine fp32 (full)": ("engine bf16", "engine fp32"),
    "engine bf16 / engine fp32 (attn-proj)": ("engine attn-proj bf16", "engine attn-proj fp32"),
    "engine / plain (bf16)": ("engine bf16", "plain bf16"),
    "engine / plain (fp32)": ("engine fp32", "plain fp32"),
    "engine / Trainer (bf16)": ("engine bf16", "trainer bf16"),
    "engine / Trainer (fp32)": ("engine fp32", "trainer fp32"),
    "plain bf16 weights + fp32 master / plain bf16 autocast": ("plain bf16 weights + fp32 master", "plain bf16"),
    "plain bf16 + torch.compile / plain bf16 autocast": ("plain bf16 + torch.compile", "plain bf16"),
    "engine bf16 + torch.compile / engine bf16": ("engine bf16 + torch.compile", "engine bf16"),
    "engine / Trainer with freed memory kept (bf16)": ("engine bf16", "trainer bf16, freed memory kept"),
    "engine fused AdamW / engine (bf16)": ("engine bf16 fused AdamW", "engine bf16"),
    "engine fused AdamW / engine (fp32)": ("engine fp32 fused AdamW", "engine fp32"),
}
TARGETS = {"engine bf16 / engine fp32 (full)": 1.5, "engine / Trainer (bf16)": 1.0, "engine / Trainer (fp32)": 1.0}
NUMBERS = {2: "two", 6: "six", 7: "seven"}  # how many runs rotate (--quick: the two engine runs)
LIMIT_TARGET = 0.8  # the engine's bf16 model FLOP/s over the bf16 matmul peak, full fine-tuning
# Targets about bf16 speed hold on machines that multiply bf16 natively; elsewhere bf16 is emulated (slower than fp32,
# and its matmul peak so low that the engine's fraction of it says nothing) and `precision: auto` trains in fp32.
BF16_SPEED_TARGETS = ("engine bf16 / engine fp32 (full)", "limit")
NO_NATIVE_BF16 = "n/a: no native bf16 here (emulated; precision auto trains fp32)"


def target_text(report: dict, key: str, value: float | None, target: float, unit: str = "") -> str:
    """A target's cell: met, NOT met, not measured, or n/a for a bf16 speed target on a machine without native bf16."""
    if key in BF16_SPEED_TARGETS and report.get("machine", {}).get("native_bf16") is False:
        return NO_NATIVE_BF16
    return f">= {target}{unit}: " + ("not measured" if value is None else "met" if value >= target else "NOT met")


def smollm2() -> Path:
    """SmolLM2's model folder, converted from its GGUF file on first use."""
    from models.gguf import converted_dir

    return converted_dir(MODEL, CACHE)[0]


def general_blocks(tokenizer, block: int) -> list[dict]:
    from perennial.demo_data import general_corpus

    return [{"input_ids": ids} for ids in pack_texts(tokenizer, general_corpus(600, 1234), block) if len(ids) == block]


def linear_shapes(model: torch.nn.Module) -> dict[tuple[int, int], list[int]]:
    """(in, out) -> [Linear layers of that shape, those whose weight trains]; a tied head is one Linear."""
    shapes: dict[tuple[int, int], list[int]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            entry = shapes.setdefault((module.in_features, module.out_features), [0, 0])
            entry[0], entry[1] = entry[0] + 1, entry[1] + module.weight.requires_grad
    return shapes


def flops_per_token(model: torch.nn.Module, seq: int) -> dict[str, int]:
    """Training FLOPs per token of a `seq`-token block, the module docstring's formula: 4·N + 2·N_trained + attention."""
    shapes, config = linear_shapes(model), model.config
    n, trained = (sum(fan_in * fan_out * counts[i] for (fan_in, fan_out), counts in shapes.items()) for i in (0, 1))
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    attention = 12 * config.num_hidden_layers * seq * width
    return {"matmul_params": n, "trained_matmul_params": trained, "attention": attention, "total": 4 * n + 2 * trained + attention}


def seconds_per_call(product, device: torch.device, min_seconds: float) -> float:
    """The median time of one call of `product`, after a warm-up call, over at least 3 calls and `min_seconds`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    product(), sync()
    times, started = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        product(), sync()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def gemm_rates(shapes: dict, tokens: int, dtype: torch.dtype, device: str = "cpu", min_seconds: float = 0.3) -> dict:
    """GFLOP/s of each GEMM a training step runs through the Linear layers `shapes` on `tokens` tokens, each timed alone
    (torch.matmul into a kept output) in the layouts the step has: forward x @ wᵀ, input gradient dy @ w, weight
    gradient dyᵀ @ x. The peak: the fastest; the step mix: one step's GEMMs, each at its rate (their FLOPs over their
    summed time)."""
    device, rows = torch.device(device), []
    for (fan_in, fan_out), (count, trained) in shapes.items():
        x, w, dy = (torch.randn(*shape, dtype=dtype, device=device) for shape in ((tokens, fan_in), (fan_out, fan_in), (tokens, fan_out)))
        for gemm, times, a, b in (("forward", count, x, w.t()), ("input gradient", count, dy, w), ("weight gradient", trained, dy.t(), x)):
            if times:
                out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=device)
                seconds = seconds_per_call(lambda: torch.matmul(a, b, out=out), device, min_seconds)
                rows.append({"in": fan_in, "out": fan_out, "gemm": gemm, "count": times, "gflop": 2 * tokens * fan_in * fan_out / 1e9,
                             "gflops": 2 * tokens * fan_in * fan_out / seconds / 1e9})
    flops, seconds = sum(r["gflop"] * r["count"] for r in rows), sum(r["gflop"] * r["count"] / r["gflops"] for r in rows)
    return {"tokens": tokens, "peak_gflops": max(r["gflops"] for r in rows), "step_mix_gflops": flops / seconds, "gemms": rows}


# what the profile of one step groups its ops into (`op_category`), in the order the report lists them
CATEGORIES = ("matmuls (Linear layers)", "attention", "optimizer and clipping", "casts and copies", "loss over the vocabulary",
              "other ops (norms, activations, rotary, embedding, ...)", "outside any op (Python, the profiler)")


def op_category(event, vocab: int) -> str:
    """One profiled op's group, by its name, its callers' and its inputs' shapes (a vocabulary-wide input: the loss)."""
    callers, parent = [], event.cpu_parent
    while parent is not None:
        callers, parent = [*callers, parent.name], parent.cpu_parent
    if event.name in ("aten::linalg_vector_norm", "aten::_foreach_norm") or any(name.startswith("Optimizer.") for name in callers):
        return CATEGORIES[2]
    if event.name in ("aten::mm", "aten::addmm"):
        return CATEGORIES[0]
    if any(isinstance(shape, list) and shape and shape[-1] == vocab for shape in event.input_shapes or []):
        return CATEGORIES[4]
    if event.name in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data") or "attention" in event.name:
        return CATEGORIES[1]
    return CATEGORIES[3] if event.name in ("aten::copy_", "aten::_to_copy", "aten::clone") else CATEGORIES[5]


def profile_child(warmup: int, precision: str = "bf16") -> dict:
    """In its own process: torch.profiler (CPU activities) over one engine step, full fine-tuning of SmolLM2, after
    `warmup` steps and one more unprofiled; milliseconds per op group (`op_category`) and the step's matmul rate. Also
    the wall milliseconds and minor page faults of the profiled step and of the unprofiled step before it: the
    profiler's own allocations interleave with the step's and can break the heap reuse of models/allocator.py, and a
    page's first touch is charged to whichever op touched it."""
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer = load_model_and_tokenizer(smollm2())
    profiler, marks = profile(activities=[ProfilerActivity.CPU], record_shapes=True), []

    def hook(step, _model):  # step `warmup + 1` runs unprofiled after the warm-up, step `warmup + 2` under the profiler
        if step in (warmup, warmup + 1, warmup + 2):
            marks.append((time.perf_counter(), minor_faults()))
        if step in (warmup + 1, warmup + 2):
            (profiler.start if step == warmup + 1 else profiler.stop)()

    train(model, general_blocks(tokenizer, REAL.block), REAL.optim_config(warmup + 2), seed=SEED, pad_token_id=tokenizer.pad_token_id,
          device=torch.device("cpu"), precision=precision, on_step_end=hook)
    (before, before_faults), (start, start_faults), (end, end_faults) = marks
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.events():
        ms[op_category(event, model.config.vocab_size)] += event.self_cpu_time_total / 1000
    ms[CATEGORIES[-1]] = max(0.0, (end - start) * 1000 - sum(ms.values()))
    flops = flops_per_token(model, REAL.block)
    return {"precision": precision, "step_ms": (end - start) * 1000, "ms": ms, "flops": flops,
            "matmul_gflops": (flops["total"] - flops["attention"]) * REAL.batch * REAL.block / ms[CATEGORIES[0]] / 1e6,
            "minor_faults": end_faults - start_faults, "unprofiled_step_before": {"ms": (start - before) * 1000, "minor_faults": start_faults - before_faults}}


def peak_child(tokens: int, min_seconds: float) -> dict:
    """In its own process: `gemm_rates` of SmolLM2's Linear layers (built on the meta device) in bf16 and fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # The config is read (and the GGUF file converted, on a machine without the cache) before the meta context:
    # under it the conversion's from_pretrained refuses to run.
    config = AutoConfig.from_pretrained(smollm2())
    with torch.device("meta"):
        shapes = linear_shapes(AutoModelForCausalLM.from_config(config))
    with freed_memory_kept():
        return {name: gemm_rates(shapes, tokens, dtype, min_seconds=min_seconds) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


@contextlib.contextmanager
def optimizer_seconds():
    """Yields a one-element list holding the wall seconds spent so far in any optimizer's ``step`` (torch's global
    step hooks, so the engine's, the plain loop's and Trainer's AdamW alike; a step called inside another, as an
    accelerate wrapper calls the AdamW it wraps, counts once)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    total, started = [0.0], []

    def pre(*_):
        started.append(time.perf_counter())

    def post(*_):
        begun = started.pop()
        if not started:
            total[0] += time.perf_counter() - begun

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    try:
        yield total
    finally:
        for handle in handles:
            handle.remove()


def throughput_child(name: str, steps: int, warmup: int) -> dict:
    """In its own (fresh) process: one throughput run, tokens/s, minor page faults and the optimizer step's
    milliseconds per step (`optimizer_seconds`): a change to the optimizer shows there even where the machine's
    step-to-step spread hides it in tokens/s."""
    model, tokenizer = load_model_and_tokenizer(smollm2())
    tuning, run = RUNS[name]
    faults, optimizer = [], []

    model = apply_tuning(model, TuningConfig(method=tuning))
    flops = flops_per_token(model, REAL.block)["total"]  # before a loop casts the weights
    with optimizer_seconds() as spent:

        def counted():
            faults.append(minor_faults())
            optimizer.append(spent[0])
            return stamp()

        stamps = run(model, general_blocks(tokenizer, REAL.block), tokenizer.pad_token_id, steps, counted)
    if len(stamps) != steps:
        raise RuntimeError(f"{name} ran {len(stamps)} steps, not {steps}")
    per_step = lambda values: statistics.median(b - a for a, b in zip(values[warmup - 1 :], values[warmup:]))  # noqa: E731
    return {**throughput(stamps, warmup, REAL), "minor_faults_per_step": per_step(faults), "optimizer_ms_per_step": per_step(optimizer) * 1000,
            "gflop_per_token": flops / 1e9}


def memory_child(kind: str, name: str, steps: int) -> dict:
    """In its own process: a short engine run of one tuning method, or of one CL method's second task."""
    from models.cl.base import TaskContext
    from models.cl.registry import build_plugins
    from perennial.demo_data import demo_tasks, task_records

    folder = smollm2()
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()  # the high-water mark just reset: the resident size now
    model, tokenizer = load_model_and_tokenizer(folder)
    tasks = [[encode_instruction(tokenizer, r["prompt"], r["response"], 64) for r in task_records(demo_tasks(1234)[task], 64, 4, 1234)
              if r["split"] == "train"] for task in ("zorbish", "arithmetic")]
    optim = OptimConfig(lr=REAL.lr, batch_size=REAL.batch, max_steps=steps, warmup_steps=0, max_length=64, log_every=10**6)
    tuning = name if kind == "tuning" else ("lora" if name == "olora" else "full")
    model = apply_tuning(model, TuningConfig(method=tuning))
    trainable, total = count_parameters(model)
    # EWC's Fisher from 8 examples, not its default 64: the memory it keeps (a Fisher and an anchor the size
    # of the trained weights) does not depend on the count, the minutes of per-example backward passes do.
    plugins = build_plugins([{"name": name, **({"fisher_samples": 8} if name == "ewc" else {})}], seed=SEED) if kind == "cl" else []
    for index, examples in enumerate(tasks if kind == "cl" else tasks[:1]):
        if index == 1 and reset:
            _reset_peak_rss()  # the second task: the plugin now holds what it keeps from the first
        context = plugins and TaskContext(task_index=index, task_name=f"task-{index}", model=model, train_examples=examples,
                                          pad_token_id=tokenizer.pad_token_id)
        for plugin in plugins:
            plugin.before_task(context)
        started = time.perf_counter()
        result = train(model, examples, optim, seed=SEED, pad_token_id=tokenizer.pad_token_id, plugins=plugins, precision="auto")
        seconds = time.perf_counter() - started
        for plugin in plugins:
            plugin.after_task(context)
    return {
        "kind": kind, "method": name, "tuning": tuning, "trainable_params": trainable, "total_params": total,
        "rss_before_model_mib": round(baseline / 1024, 1),
        "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
        "steps": steps, "last_task_seconds": round(seconds, 1), "final_loss": result.losses[-1],
    }


def checkpointing_child(tuning: str, checkpointing: bool, steps: int, warmup: int, model: str = "smollm2", quick: bool = False) -> dict:
    """In its own process: `model` of CKPT_MODELS tuned by `tuning` trains `steps` engine steps (precision auto) on its
    blocks with activation checkpointing off or on; peak RSS above the resident size before the model is built, tokens/s.
    llama-1b: random weights (tests/tiny_models.py's factory, as bench/gpu.py builds its Llamas) on random token ids."""
    settings = QUICK_CKPT if quick else CKPT_MODELS[model][0]
    folder = smollm2() if model == "smollm2" else None
    reset = _reset_peak_rss()
    baseline = _peak_rss_kib()
    if folder:
        net, tokenizer = load_model_and_tokenizer(folder)
        blocks, pad = general_blocks(tokenizer, settings.block), tokenizer.pad_token_id
    else:
        from tests.tiny_models import tiny_model

        net = tiny_model("llama", vocab_size=64) if quick else tiny_model("llama", **LLAMA_1B)
        ids = torch.randint(1, net.config.vocab_size, (16, settings.block), generator=torch.Generator().manual_seed(SEED))  # 0 pads
        blocks, pad = [{"input_ids": row} for row in ids.tolist()], 0
    stamps, net = [], apply_tuning(net, TuningConfig(method=tuning))
    trainable, total = count_parameters(net)
    result = train(net, blocks, settings.optim_config(steps, activation_checkpointing=checkpointing),
                   seed=SEED, pad_token_id=pad, precision="auto", on_step_end=lambda step, _model: stamps.append(stamp()))
    return {"model": model, "tuning": tuning, "activation_checkpointing": checkpointing, "final_loss": result.losses[-1],
            "trainable_params": trainable, "params": total, "training_peak_above_baseline_mib": round((_peak_rss_kib() - baseline) / 1024, 1) if reset else None,
            "tokens_per_s": throughput(stamps, warmup, settings)}


CHILDREN = {"throughput": throughput_child, "memory": memory_child, "checkpointing": checkpointing_child, "peak": peak_child,
            "profile": profile_child}


def measure_checkpointing(args, argv: list[str], load_before: float) -> dict:
    rows = []
    for model in args.models:
        for tuning in args.tunings or CKPT_MODELS[model][1]:
            for on in (False, True):
                job = {"model": model, "tuning": tuning, "checkpointing": on}
                try:
                    rows.append(child(MODULE, {"run": "checkpointing", **job, "steps": args.steps, "warmup": args.warmup,
                                               "threads": args.threads, "quick": args.quick}))
                except RuntimeError as error:  # one that does not fit (killed for memory) gets a row saying why
                    rows.append({**job, "activation_checkpointing": on, "error": str(error).strip().splitlines()[-1]})
                row = rows[-1]
                print(f"{model} {tuning} checkpointing {'on' if on else 'off'}: " + (row.get("error") or (
                    f"{row['training_peak_above_baseline_mib']} MiB, {row['tokens_per_s']['cpu']:.0f} tokens per CPU-second")), flush=True)
    blocks = {model: QUICK_CKPT if args.quick else CKPT_MODELS[model][0] for model in args.models}
    return {**report_head(MODULE, argv, load_before), "settings": {
        "models": {model: {"batch": s.batch, "block": s.block, **({"shape": LLAMA_1B} if model == "llama-1b" and not args.quick else {})}
                   for model, s in blocks.items()},
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "precision": "auto", "attn_implementation": "eager"},
        "runs": rows}


def checkpointing_markdown(report: dict) -> str:
    """`### Activation checkpointing`, below the engine's section: peak memory and tokens/s off and on, per model."""
    settings = report["settings"]
    models = settings.get("models") or {"smollm2": {"batch": settings["batch"], "block": settings["block"]}}  # before llama-1b
    names = {"smollm2": "SmolLM2-135M-Instruct", "llama-1b": "Llama 1.1B (random weights)" if "shape" in models.get("llama-1b", {})
             else "the factory's tiny Llama (--quick)"}
    head = section_head("Activation checkpointing (`optim.activation_checkpointing`)", report)
    off = {(run.get("model", "smollm2"), run["tuning"]): run for run in report["runs"] if not run["activation_checkpointing"]}

    def change(run, value):
        base = off.get((run.get("model", "smollm2"), run["tuning"]), {})
        return "" if not run["activation_checkpointing"] or not base or "error" in base or not value(base) else f" ({value(run) / value(base) - 1:+.0%})"

    peak, cpu = (lambda run: run["training_peak_above_baseline_mib"] or 0), (lambda run: run["tokens_per_s"]["cpu"])
    return "\n".join(["#" + head[0], *head[1:], "",
        "; ".join(f"{names.get(model, model)} on {m['batch']} block{'s' * (m['batch'] > 1)} of {m['block']} tokens a step" for model, m in models.items())
        + f" (eager attention), precision auto, {settings['steps']} engine "
        f"steps, the first {settings['warmup']} not timed, {settings['threads']} torch thread{'s' * (settings['threads'] > 1)}, each run in a fresh process. "
        "Peak: the resident high-water mark above the resident size before the model is built (weights, gradients and AdamW state "
        "included)." + (" The 1B Llama has TinyLlama-1.1B's shape (hidden 2048, 22 layers, MLP 5632, 32 query / 4 KV heads, vocabulary "
        "32,000) with random weights, on random token ids; attn-proj by default, as full fine-tuning's fp32 weights, gradients "
        "and two AdamW states alone are 17.6 GB." if "shape" in models.get("llama-1b", {}) else ""), "",
        table(["model", "tuning", "activation checkpointing", "training peak RSS (MiB)", "tokens per CPU-second (median step)",
               "tokens per wall-second", "final loss"],
              [[names.get(run.get("model", "smollm2"), run.get("model")), run["tuning"], "on" if run["activation_checkpointing"] else "off",
                *([run["error"], "", "", ""] if "error" in run else [
                    "n/a" if run["training_peak_above_baseline_mib"] is None else f"{peak(run):.0f}{change(run, peak)}",
                    f"{cpu(run):.0f}{change(run, cpu)}", f"{run['tokens_per_s']['wall']:.0f}", f"{run['final_loss']:.4f}"])]
               for run in report["runs"]]),
        *(["", report["reading"]] if report.get("reading") else [])]) + "\n"


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: who goes first moves on each round, so a burst of outside load does not land on
    one run only."""
    return [names[r % len(names):] + names[: r % len(names)] for r in range(rounds)]


def throughput_run(name: str, args) -> dict[str, float]:
    """One RUNS entry in a fresh process (`throughput_child`)."""
    return child(MODULE, {"run": "throughput", "name": name, "steps": args.steps, "warmup": args.warmup, "threads": args.threads})


def compare_pair(args) -> dict[str, float]:
    """--compare A B: the two runs in fresh processes, in rotated order over the rounds; tokens per wall-second at
    the median step, the median over rounds, and A / B."""
    walls: dict[str, list[float]] = {name: [] for name in args.compare}
    optimizer: dict[str, list[float]] = {name: [] for name in args.compare}
    for index, order in enumerate(rotations(args.compare, args.rounds)):
        for name in order:
            run = throughput_run(name, args)
            walls[name].append(run["wall"])
            optimizer[name].append(run["optimizer_ms_per_step"])
            print(f"round {index + 1}/{args.rounds} {name:34s} {walls[name][-1]:,.0f} tokens/s, optimizer step "
                  f"{optimizer[name][-1]:,.0f} ms", flush=True)
    median = {name: statistics.median(values) for name, values in walls.items()}
    first, second = args.compare
    print(f"{first} / {second}: {median[first] / median[second]:.2f}x (medians {median[first]:,.0f} and {median[second]:,.0f} "
          f"tokens/s over {args.rounds} rounds, {args.threads} torch threads); optimizer step "
          f"{statistics.median(optimizer[first]):,.0f} and {statistics.median(optimizer[second]):,.0f} ms")
    return median


def measure(args, argv: list[str], load_before: float) -> dict:
    names = ["engine bf16", "engine fp32"] if args.quick else list(RUNS)
    # ROTATED in `rounds` rounds, then the others once
    rotated = [name for name in ROTATED if name in names]
    schedule = [*rotations(rotated, args.rounds), [n for n in names if n not in ROTATED]]
    runs: dict[str, dict[str, list[float]]] = {}
    peaks = []  # the matmul rates, once at the start of each round
    for index, order in enumerate(schedule):
        if index < args.rounds:
            peaks.append(child(MODULE, {"run": "peak", "tokens": REAL.batch * REAL.block, "min_seconds": 0.05 if args.quick else 0.3,
                                        "threads": args.threads}))
            print(f"round {index + 1}/{args.rounds} matmul peak " + "  ".join(f"{k} {v['peak_gflops']:,.0f} GFLOP/s" for k, v in peaks[-1].items()), flush=True)
        for name in order:
            for key, value in throughput_run(name, args).items():
                runs.setdefault(name, {}).setdefault(key, []).append(value)
            print(f"round {min(index, args.rounds - 1) + 1}/{args.rounds} {name:34s} "
                  + "  ".join(f"{key} {values[-1]:,.0f}" for key, values in runs[name].items()), flush=True)
    median = {name: {key: statistics.median(values) for key, values in run.items()} for name, run in runs.items()}
    profile = child(MODULE, {"run": "profile", "warmup": args.warmup, "threads": args.threads})
    memory = []
    for kind, methods in QUICK_MEMORY if args.quick else MEMORY:
        for method in methods:
            try:
                memory.append(child(MODULE, {"run": "memory", "kind": kind, "name": method, "steps": args.rss_steps, "threads": args.threads}))
            except RuntimeError as error:  # a method that does not fit gets a row saying why
                memory.append({"kind": kind, "method": method, "error": str(error).strip().splitlines()[-1]})
            print(f"memory {kind:6s} {method:12s} {memory[-1].get('training_peak_above_baseline_mib', memory[-1].get('error'))}", flush=True)
    return {
        **report_head(MODULE, argv, load_before),
        "settings": {"model": MODEL, "steps": args.steps, "warmup_steps_excluded": args.warmup, "rounds": args.rounds,
                     "batch": REAL.batch, "block": REAL.block, "lr": REAL.lr, "threads": args.threads, "process_per_run": True,
                     "trainer_optim": "adamw_torch", "attn_implementation": "eager", "rotated": rotated},
        "tokens_per_s": {name: {"tuning": RUNS[name][0], "median": median[name], "runs": runs[name]} for name in names},
        "ratios": {key: median[a]["wall"] / median[b]["wall"] if a in median and b in median else None for key, (a, b) in RATIOS.items()},
        "matmul_peak": {dtype: {**peaks[0][dtype], **{key: statistics.median(p[dtype][key] for p in peaks) for key in ("peak_gflops", "step_mix_gflops")},
                                "gemms": [{**row, "gflops": statistics.median(p[dtype]["gemms"][i]["gflops"] for p in peaks)}
                                          for i, row in enumerate(peaks[0][dtype]["gemms"])], "rounds": [p[dtype]["peak_gflops"] for p in peaks]}
                        for dtype in peaks[0]},
        "profile": profile,
        "peak_rss": memory,
    }


def markdown(report: dict) -> str:
    """The report's section of BENCHMARKS.md, `## Training engine` (--activation-checkpointing's: `checkpointing_markdown`)."""
    if "runs" in report:
        return checkpointing_markdown(report)
    settings, median = report["settings"], {k: v["median"] for k, v in report["tokens_per_s"].items()}
    peak, dtype = report.get("matmul_peak"), lambda name: "bf16" if "bf16" in name else "fp32"
    timed = all("optimizer_ms_per_step" in m for m in median.values())  # a report from before the column has none
    lines = [
        *section_head("Training engine", report), "",
        f"SmolLM2-135M-Instruct (the embedded default) on the demo general corpus, {settings['batch']} blocks of "
        f"{settings['block']} tokens a step, AdamW at {settings['lr']}, {settings['steps']} steps of which the first "
        f"{settings['warmup_steps_excluded']} are excluded, {settings['threads']} torch threads; the first "
        f"{NUMBERS[len(settings.get('rotated', ROTATED[:6]))]} runs in "
        f"rotated order over {settings['rounds']} rounds (median), the others once, each run in a fresh process. bf16 = "
        "autocast with fp32 master weights unless named otherwise. The engine's loop keeps freed heap memory for reuse "
        "(models/allocator.py); the plain loop and Trainer run with glibc's defaults, as a user's process would.", "",
        "Model FLOPs (the GFLOP/s columns), per token: 2·N forward, 2·N for the input gradients and 2·N_trained for the "
        "weight gradients, N the weights of every Linear layer (q, k, v, o, gate, up, down and the head; the head tied to "
        "the embedding counts once, the embedding lookup is no matmul), so 6·N for full fine-tuning; plus attention, "
        "12·layers·seq·d (d = heads × head dim): the scores Q·Kᵀ and the values A·V take 2·seq·d each per token and layer "
        "forward, three times that with backward, the causal mask not halved." + (
            f" SmolLM2 at {settings['block']}-token blocks: N = {flops['matmul_params']:,}, {flops['total'] / 1e9:.3f} GFLOP a token for "
            f"full fine-tuning (6·N {6 * flops['matmul_params'] / 1e9:.3f}, attention {flops['attention'] / 1e9:.3f})."
            if (flops := report.get("profile", {}).get("flops")) else ""), "",
        "### Throughput (tokens/s at the median step)", "",
        table(["run", "tuning", "per wall-second (headline)", "per CPU-second", "minor page faults per step", *(
                  ["model GFLOP/s", "of the matmul peak (its dtype)"] if peak else []), *(["optimizer step (ms)"] if timed else [])],
              [[name, report["tokens_per_s"][name]["tuning"], f"{m['wall']:.0f}", f"{m['cpu']:.0f}", f"{m['minor_faults_per_step']:,.0f}", *(
                  [f"{m['wall'] * m['gflop_per_token']:.0f}", f"{m['wall'] * m['gflop_per_token'] / peak[dtype(name)]['peak_gflops']:.2f}"]
                  if peak else []), *([f"{m['optimizer_ms_per_step']:.0f}"] if timed else [])] for name, m in median.items()]), "",
        table(["ratio (wall)", "value", "target"],
              [[key, "n/a" if value is None else f"{value:.2f}x",
                "" if key not in TARGETS else target_text(report, key, value, TARGETS[key], "x")]
               for key, value in report["ratios"].items()]),
    ]
    if peak:
        lines += ["", *limit_markdown(report, median)]
    if rss := report.get("peak_rss"):
        lines += [
            "", f"### Peak resident memory ({rss[0].get('steps', '?')} engine steps, bf16 autocast, one fresh process each)", "",
            "Above the process's resident size before the model is built; a CL method's row is its second task "
            "(EWC holds the first task's Fisher, LwF and SEEKR a frozen teacher, averaging the previous weights). "
            "Replay has no plugin state: its cost is the replayed examples, not a model-sized tensor.", "",
            table(["kind", "method", "tuning", "trainable params", "training peak above pre-model RSS (MiB)"],
                  [[row["kind"], row["method"], row.get("tuning", ""), row.get("trainable_params", ""),
                    row.get("error") or ("n/a" if row["training_peak_above_baseline_mib"] is None else f"{row['training_peak_above_baseline_mib']:.0f}")]
                   for row in rss]),
        ]
    return "\n".join(lines + (["", report["reading"]] if report.get("reading") else [])) + "\n"


def limit_markdown(report: dict, median: dict) -> list[str]:
    """`### How close to the limit`: the engine's model FLOP/s against the matmul rates, and the profile of one step."""
    peak, profile = report["matmul_peak"], report["profile"]
    engine = {dtype: median[f"engine {dtype}"]["wall"] * median[f"engine {dtype}"]["gflop_per_token"] for dtype in peak if f"engine {dtype}" in median}
    fraction = {dtype: value / peak[dtype]["peak_gflops"] for dtype, value in engine.items()}
    total = sum(profile["ms"].values())
    return [
        "### How close to the limit (full fine-tuning)", "",
        f"Every GEMM a training step runs through SmolLM2's Linear layers, timed alone with torch.matmul on {peak['bf16']['tokens']} "
        f"tokens and {report['settings']['threads']} torch threads in a fresh process at the start of each round (median of "
        f"{len(peak['bf16']['rounds'])}); the peak is the fastest GEMM, the step mix one step's GEMMs each at its own rate.", "",
        table(["", *peak], [
            ["matmul peak, fastest GEMM (GFLOP/s)", *(f"{v['peak_gflops']:.0f}" for v in peak.values())],
            ["matmul rate of the step's GEMM mix (GFLOP/s)", *(f"{v['step_mix_gflops']:.0f}" for v in peak.values())],
            ["engine, full fine-tuning (model GFLOP/s)", *(f"{engine[d]:.0f}" if d in engine else "n/a" for d in peak)],
            ["engine / matmul peak", *(f"{fraction[d]:.2f}" + (f" (target {target_text(report, 'limit', fraction[d], LIMIT_TARGET)})"
                                                             if d == "bf16" else "") if d in fraction else "n/a" for d in peak)],
            ["engine / step mix", *(f"{engine[d] / peak[d]['step_mix_gflops']:.2f}" if d in engine else "n/a" for d in peak)]]), "",
        table(["GEMM (in -> out)", "pass", "per step", "GFLOP each", *(f"{d} GFLOP/s" for d in peak)],
              [[f"{row['in']} -> {row['out']}", row["gemm"], row["count"], f"{row['gflop']:.2f}",
                *(f"{peak[d]['gemms'][i]['gflops']:.0f}" for d in peak)] for i, row in enumerate(peak["bf16"]["gemms"])]), "",
        f"One engine step ({profile['precision']}, full fine-tuning) under torch.profiler (CPU activities), by self time: "
        f"{profile['step_ms']:.0f} ms with the profiler on; its matmuls ran at {profile['matmul_gflops']:.0f} GFLOP/s, "
        f"{profile['matmul_gflops'] / peak[profile['precision']]['step_mix_gflops']:.2f} of the step mix's rate." + (
            f" The profiled step took {profile['minor_faults']:,} minor page faults, the unprofiled step before it "
            f"{unprofiled['minor_faults']:,} in {unprofiled['ms']:.0f} ms: the profiler's own allocations can break the heap "
            "reuse of models/allocator.py, and each page's first touch is charged to the op that touched it (the loss's "
            "and the zero-fills' ops most), so the groups below are an upper bound for those ops."
            if (unprofiled := profile.get("unprofiled_step_before")) else ""), "",
        table(["op group", "ms", "share"], [[name, f"{ms:.0f}", f"{ms / total:.1%}"] for name, ms in profile["ms"].items()]),
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help="optimizer steps per run, warm-up included (default 8; --activation-checkpointing 4)")
    parser.add_argument("--warmup", type=int, help="steps excluded from the timing (default 2; --activation-checkpointing 1)")
    parser.add_argument("--rounds", type=int, default=2, help="rotated rounds of the side-by-side runs, median reported (default 2)")
    parser.add_argument("--rss-steps", type=int, default=3, help="engine steps per memory run (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default 2; --activation-checkpointing 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, one round, the engine runs and a few memory rows")
    parser.add_argument("--output", type=Path, help="the JSON report, the .md beside it (default bench/results/engine_throughput.json)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="only the peak memory and tokens/s with optim.activation_checkpointing off and on")
    parser.add_argument("--models", nargs="+", choices=list(CKPT_MODELS), default=list(CKPT_MODELS),
                        help="--activation-checkpointing: the models (default both)")
    parser.add_argument("--tunings", nargs="+", help="--activation-checkpointing: these tuning methods for every model "
                        "(default: SmolLM2 full and attn-proj, llama-1b attn-proj)")
    parser.add_argument("--compare", nargs=2, metavar="RUN", choices=list(RUNS),
                        help="only these two throughput runs, side by side in alternating order over --rounds: prints each "
                        "run and the ratio of the medians (first / second), writes nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON job of CHILDREN, run in this fresh process
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        torch.set_num_threads(job.pop("threads"))
        print(json.dumps(CHILDREN[job.pop("run")](**job)))  # the line `bench.common.child` reads
        return 0
    args.steps, args.warmup, args.threads = (given or default for given, default in zip(
        (args.steps, args.warmup, args.threads), (4, 1, 1) if args.activation_checkpointing else (8, 2, 2)))
    if args.quick:
        args.steps, args.warmup, args.rounds, args.rss_steps = 3, 1, 1, 2
    torch.set_num_threads(args.threads)  # the report's machine line; each child sets its own
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    if args.compare:
        compare_pair(args)
        return 0
    if args.activation_checkpointing:
        output = args.output or RESULTS_DIR / "engine_activation_checkpointing.json"
        report = measure_checkpointing(args, argv, os.getloadavg()[0])
        write_results(output.stem, report, markdown(report), output.parent)
        return 0
    output = args.output or RESULTS_DIR / "engine_throughput.json"
    report = measure(args, argv, os.getloadavg()[0])
    text = markdown(report)
    print(text)
    write_results(output.stem, report, text, output.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
