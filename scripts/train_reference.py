"""Train moerun's small reference MoE language model on the Python standard library.

The model is an OLMoE (``transformers.OlmoeForCausalLM``): 4 layers, hidden 256, 8 experts of which 2
are routed per token, and a byte-level BPE tokenizer trained on the same corpus. The corpus is the
``*.py`` source of the running interpreter's standard library, which exists offline on every machine.
A fixed list of modules is held out of both tokenizer and model training; those files ship next to the
checkpoint so that perplexity can be measured on text the model never saw.

Everything is deterministic for a given Python version: the file list is sorted, the data order comes
from a seeded generator, torch runs on a fixed number of threads with deterministic algorithms.

    python scripts/train_reference.py                      # full run, ~20 min on 2 quiet cores
    python scripts/train_reference.py --max-steps 5 --out /tmp/ref   # smoke run

Shape legend: B batch, T sequence length, V vocabulary, N tokens in a packed stream, W windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":
    # Other processes often share our 2 cores. Spinning OpenMP workers then burn the time slices their
    # partner thread needs and steps slow down ~10x; sleeping workers cost ~10% on a quiet machine at most.
    # It must be set before torch loads OpenMP, and only when run as a script (importing has no side effects).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "moerun" / "assets" / "reference_model"

EOS_TOKEN = "<|endoftext|>"

# Directories of the stdlib left out of the corpus: other packages, test suites (huge, repetitive and full
# of deliberately odd code), IDLE and lib2to3 (large, niche, lib2to3 has its own test data), codec tables
# and pydoc's generated topic text (data rather than code), and the bundled-wheel installer.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "encodings", "pydoc_data", "ensurepip", "__pycache__"}
)
# Single files that are data tables, not code.
EXCLUDED_FILES = frozenset({"html/entities.py"})
# Generated per build (``_sysconfigdata_<abi>_<platform>.py``): machine-specific, not stdlib source.
EXCLUDED_PREFIXES = ("_sysconfigdata_",)

# Held out of tokenizer and model training; ~157 KB on Python 3.11. A fixed list rather than a hash bucket
# so that a reader sees at once what the held-out perplexity is measured on.
HELDOUT_FILES = (
    "bisect.py",
    "csv.py",
    "fractions.py",
    "graphlib.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "textwrap.py",
)

SAMPLE_PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    "    for i in range(len(items)):",
)


# --------------------------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus(root: Path) -> list[str]:
    """All corpus files under ``root``, as sorted POSIX paths relative to it.

    Args:
        root: the standard library directory (see :func:`stdlib_dir`).

    Returns:
        ``*.py`` files outside :data:`EXCLUDED_DIRS`, minus :data:`EXCLUDED_FILES` and generated
        ``_sysconfigdata_*`` modules, sorted so that every run sees the same order.
    """
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so that os.walk never descends into site-packages (hundreds of MB) or the test suites.
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES) and rel not in EXCLUDED_FILES:
                files.append(rel)
    return sorted(files)


def split_heldout(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the corpus into (train, held-out) file lists, both sorted.

    Raises:
        ValueError: a file of :data:`HELDOUT_FILES` is not in ``files`` (a different Python layout), since
            silently evaluating on fewer files would make held-out numbers incomparable.
    """
    missing = sorted(set(HELDOUT_FILES) - set(files))
    if missing:
        raise ValueError(f"held-out files missing from the corpus: {', '.join(missing)}")
    heldout = set(HELDOUT_FILES)
    return sorted(f for f in files if f not in heldout), sorted(heldout)


def heldout_name(rel: str) -> str:
    """The flat file name a held-out file is shipped under: ``json/decoder.py`` -> ``json__decoder.py``."""
    return rel.replace("/", "__")


def files_digest(files: Sequence[str]) -> str:
    """SHA-256 of a file list (one path a line), to compare corpora without storing them."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def read_sources(root: Path, files: Sequence[str]) -> list[str]:
    """The text of each file. The stdlib is UTF-8 (PEP 3120); decoding bytes keeps line endings as they are."""
    return [(root / f).read_bytes().decode("utf-8") for f in files]


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE tokenizer on ``texts``; ``<|endoftext|>`` is id 0 and is prepended as BOS.

    Byte-level BPE maps every byte to a symbol, so decoding reproduces any text exactly, including runs
    of spaces, tabs and newlines (indentation is syntax in Python).

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    # Training packs every file behind an EOS, so a prompt that starts with one looks like the start of a file.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B", special_tokens=[(EOS_TOKEN, 0)]
    )
    return tokenizer


def save_tokenizer(tokenizer, out: Path, max_length: int):
    """Save ``tokenizer`` as a transformers fast tokenizer (``AutoTokenizer.from_pretrained(out)`` loads it).

    Returns:
        the ``PreTrainedTokenizerFast`` that was saved.
    """
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # transformers' default clean-up rewrites " ." to "." etc., which would corrupt code on decode.
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
    )
    fast.save_pretrained(out)
    # transformers 5 writes its own backend class name; the generic name also loads on transformers 4.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return fast


def pack(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Tokenize ``texts`` and concatenate them, each preceded by EOS (id 0): ``[N]`` int64."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids = []
    for enc in encodings:
        ids.append(eos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int64)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a packed stream into non-overlapping windows ``[W, T]``; the tail shorter than T is dropped."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


# -------------------------------------------------------------------------------------- model, training


def build_model(args: argparse.Namespace, vocab_size: int):
    """A freshly initialised ``OlmoeForCausalLM`` (seed torch before calling for a reproducible init)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.seq_len,
        # Tied input/output embeddings: the [V, H] matrix is a quarter of the model otherwise.
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        # Router logits feed the load-balancing loss during training; switched off in the saved config.
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    model = OlmoeForCausalLM(config)
    # The eager per-expert loop trains fastest on CPU here (grouped_mm falls back to a slow path in fp32).
    model.set_experts_implementation("eager")
    return model


def lr_at(step: int, max_steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_order(num_windows: int, batch_size: int, max_steps: int, seed: int) -> torch.Tensor:
    """Window indices ``[max_steps, B]``: a seeded permutation per epoch, concatenated, so no window repeats
    within an epoch and the order depends on nothing but the seed."""
    gen = torch.Generator().manual_seed(seed)
    needed = max_steps * batch_size
    perms = [torch.randperm(num_windows, generator=gen) for _ in range(math.ceil(needed / num_windows))]
    return torch.cat(perms)[:needed].view(max_steps, batch_size)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (embeddings, projections, experts, routers), not norm gains."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fmt_seconds(seconds: float) -> str:
    """``h:mm:ss`` / ``m:ss``."""
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(model, train_windows: torch.Tensor, args: argparse.Namespace) -> dict:
    """Train ``model`` in place on ``train_windows`` ``[W, T]``; returns training statistics."""
    order = batch_order(train_windows.shape[0], args.batch_size, args.max_steps, args.seed)  # [steps, B]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=False
    )
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    recent: list[float] = []
    curve: list[list[float]] = []  # [step, mean LM loss over the last log_every steps]
    start = time.perf_counter()
    for step in range(args.max_steps):
        lr = lr_at(step, args.max_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_windows[order[step]]  # [B, T]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # out.loss includes the router's load-balancing term; report the language-model loss on its own.
        aux = out.aux_loss.item()
        lm_loss = out.loss.item() - model.config.router_aux_loss_coef * aux
        recent = (recent + [lm_loss])[-args.log_every :]
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            elapsed = time.perf_counter() - start
            per_step = elapsed / (step + 1)
            curve.append([step + 1, round(sum(recent) / len(recent), 4)])
            print(
                f"step {step + 1:5d}/{args.max_steps} | loss {sum(recent) / len(recent):.4f} | aux {aux:.3f}"
                f" | lr {lr:.2e} | {tokens_per_step / per_step:,.0f} tok/s"
                f" | elapsed {fmt_seconds(elapsed)} | eta {fmt_seconds(per_step * (args.max_steps - step - 1))}",
                flush=True,
            )
    seconds = time.perf_counter() - start
    return {
        "steps": args.max_steps,
        "tokens_seen": args.max_steps * tokens_per_step,
        "epochs": round(args.max_steps * args.batch_size / train_windows.shape[0], 3),
        "final_train_loss": round(sum(recent) / len(recent), 4),
        "final_train_loss_window_steps": len(recent),
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(args.max_steps * tokens_per_step / seconds),
        "loss_curve": curve,
    }


@torch.inference_mode()
def heldout_nll(model, eval_windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats) over every window position but the first."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, eval_windows.shape[0], batch_size):
        batch = eval_windows[i : i + batch_size]  # [B, T]
        logits = model(input_ids=batch, output_router_logits=False).logits.float()  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += nll.item()
        count += batch[:, 1:].numel()
    return total / count


def unigram_nll(train_stream: torch.Tensor, eval_windows: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL (nats) of the same targets as :func:`heldout_nll` under add-one-smoothed unigram
    frequencies of the training stream: the baseline that ignores context entirely."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0  # [V]
    log_p = counts.log() - counts.sum().log()
    return -log_p[eval_windows[:, 1:].reshape(-1)].mean().item()


# ------------------------------------------------------------------------------------------- checking


def generate_samples(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> dict[str, str]:
    """Greedy completions of ``prompts`` from the saved checkpoint, loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    samples = {}
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        samples[prompt] = tokenizer.decode(ids[0], skip_special_tokens=True)
    return samples


def looks_like_python(text: str) -> bool:
    """A coarse check that a completion is code-shaped: indented lines and at least one Python keyword."""
    keywords = ("return", "if ", "for ", "def ", "import ", "self", "else", "raise ", "in ")
    return "\n    " in text and any(k in text for k in keywords)


def check_round_trip(tokenizer, texts: Sequence[str]) -> None:
    """Raise if decode(encode(text)) differs from any text (e.g. whitespace lost).

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer.
        texts: source files.
    """
    for text in texts:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        ids = getattr(encoded, "ids", encoded)  # tokenizers returns an Encoding, transformers a list
        if tokenizer.decode(ids) != text:
            raise RuntimeError("tokenizer does not round-trip Python source exactly")


# ------------------------------------------------------------------------------------------- writing


HELDOUT_README = """\
# Held-out evaluation files

These files are copied unchanged from the standard library of CPython {python} (`Lib/<path>`, with `/`
in the path written as `__` in the file name). They were excluded from both tokenizer and model
training of the reference model in the parent directory, so perplexity on them measures generalisation.

| file | original path | bytes |
|---|---|---:|
{rows}

They are Copyright (c) 2001 Python Software Foundation; All Rights Reserved, and are distributed under the
PSF License Agreement (Python Software Foundation License Version 2), https://docs.python.org/3/license.html.
"""

# The held-out copies are third-party source, not moerun code: keep the repository's linters off them.
HELDOUT_RUFF = 'exclude = ["*"]\n'


def write_heldout(root: Path, heldout: Sequence[str], out: Path) -> None:
    """Copy the held-out files to ``out`` with a README naming their origin and licence."""
    out.mkdir(parents=True)
    rows = []
    for rel in heldout:
        shutil.copyfile(root / rel, out / heldout_name(rel))
        rows.append(f"| `{heldout_name(rel)}` | `{rel}` | {(root / rel).stat().st_size} |")
    (out / "README.md").write_text(HELDOUT_README.format(python=platform.python_version(), rows="\n".join(rows)))
    (out / "ruff.toml").write_text(HELDOUT_RUFF)


def install(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint ``tmp`` to ``out``, replacing any previous one, never leaving ``out``
    half-written: renames within one directory are atomic."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def dir_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line arguments; defaults are the shipped checkpoint's settings."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (replaced when done)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch and tokenizer threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=256, help="per expert")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    # ~1.3 s a step on 2 quiet cores (4096 tokens, ~3,200 tok/s): 850 steps is ~19 min of training, ~1.5
    # epochs of the ~2.4 M-token corpus. Sized in steps, not seconds, so that a busy machine gives the same model.
    p.add_argument("--max-steps", type=int, default=850)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # Off by default: on our 2-core AVX-512 BF16 machine bf16 autocast trained ~7% slower than fp32 at
    # this size (3,030 vs 3,260 tok/s), the matrices being too small for the bf16 GEMMs to pay off.
    p.add_argument("--bf16-autocast", action="store_true")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample-tokens", type=int, default=64, help="new tokens per quality-check sample")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the corpus, train tokenizer and model, evaluate, and write the checkpoint to ``--out``."""
    args = parse_args(argv)
    wall_start = time.perf_counter()
    # tokenizers sizes its rayon pool from this on first use; pinning it keeps runs comparable.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    root = stdlib_dir()
    files = list_corpus(root)
    train_files, heldout_files = split_heldout(files)
    train_texts, heldout_texts = read_sources(root, train_files), read_sources(root, heldout_files)
    train_bytes = sum(len(t.encode()) for t in train_texts)
    heldout_bytes = sum(len(t.encode()) for t in heldout_texts)
    print(
        f"corpus: {root}, {len(train_files)} training files ({train_bytes:,} bytes), "
        f"{len(heldout_files)} held-out files ({heldout_bytes:,} bytes)",
        flush=True,
    )

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_texts, args.vocab_size)
    check_round_trip(tokenizer, heldout_texts)
    tokenizer_seconds = time.perf_counter() - t0
    vocab_size = tokenizer.get_vocab_size()
    train_stream, heldout_stream = pack(tokenizer, train_texts), pack(tokenizer, heldout_texts)  # [N]
    train_windows = windows(train_stream, args.seq_len)  # [W, T]
    eval_windows = windows(heldout_stream, args.seq_len)  # [W, T]
    print(
        f"tokenizer: vocab {vocab_size}, trained in {tokenizer_seconds:.1f} s; {train_stream.numel():,} training "
        f"tokens ({train_bytes / train_stream.numel():.2f} bytes/token), {heldout_stream.numel():,} held-out tokens",
        flush=True,
    )

    model = build_model(args, vocab_size)
    n_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = n_params - expert_params + expert_params * args.top_k // args.experts
    print(f"model: {n_params:,} parameters ({expert_params:,} in experts, {active:,} active per token)", flush=True)

    stats = train(model, train_windows, args)

    # Evaluate the weights as shipped: rounded to bf16, computed in fp32.
    model.to(torch.bfloat16)
    model.config.output_router_logits = False
    out = args.out.resolve()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        model.float()
        nll = heldout_nll(model, eval_windows, args.batch_size)
        uni = unigram_nll(train_stream, eval_windows, vocab_size)
        print(
            f"held-out: loss {nll:.4f}, perplexity {math.exp(nll):.2f}; unigram baseline perplexity "
            f"{math.exp(uni):.2f}",
            flush=True,
        )

        fast = save_tokenizer(tokenizer, tmp, args.seq_len)
        # Through transformers as well (its decode has clean-up options); excerpts stay within model_max_length.
        check_round_trip(fast, [text[:600] for text in heldout_texts])
        model.generation_config.update(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False)
        model.generation_config.save_pretrained(tmp)
        write_heldout(root, heldout_files, tmp / "heldout")
        samples = generate_samples(tmp, SAMPLE_PROMPTS, args.sample_tokens)
        for prompt, text in samples.items():
            ok = "ok" if looks_like_python(text[len(prompt) :]) else "NOT PYTHON-LIKE"
            print(f"--- sample ({ok}) ---\n{text}\n", flush=True)

        meta = {
            "python_version": platform.python_version(),
            "torch_version": torch.__version__,
            "transformers_version": __import__("transformers").__version__,
            "tokenizers_version": __import__("tokenizers").__version__,
            "seed": args.seed,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
            "parameters": n_params,
            "active_parameters_per_token": active,
            "vocab_size": vocab_size,
            "corpus": {
                "root": "sysconfig.get_paths()['stdlib']",
                "train_files_count": len(train_files),
                "train_bytes": train_bytes,
                "train_tokens": train_stream.numel(),
                "train_files_sha256": files_digest(train_files),
                "train_files": train_files,
                "heldout_files": heldout_files,
                "heldout_bytes": heldout_bytes,
                "heldout_tokens": heldout_stream.numel(),
                "heldout_tokens_scored": eval_windows[:, 1:].numel(),
            },
            **stats,
            "heldout_loss": round(nll, 4),
            "heldout_perplexity": round(math.exp(nll), 3),
            "unigram_heldout_perplexity": round(math.exp(uni), 3),
            "tokenizer_seconds": round(tokenizer_seconds, 1),
            "samples": samples,
            "machine": {"cpu_threads": args.threads, "platform": platform.platform()},
        }
        meta["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
        install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"wrote {out} ({dir_bytes(out) / 2**20:.1f} MiB) in {fmt_seconds(time.perf_counter() - wall_start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
