"""What plait's bf16 / int8 / int4 weights cost in accuracy, on real text, against fp32.

    .venv/bin/python benchmarks/quant_accuracy.py                 # 24 SQuAD passages x 256 tokens
    .venv/bin/python benchmarks/quant_accuracy.py --passages 4    # smoke run

The reference is plait fp32: the GGUF's Q4_1 weights dequantised exactly. Every variant scores
the same token ids (distinct SQuAD dev contexts, plait's tokenizer) in one full pass each, and
reports, over all predicted positions:
  * perplexity of the passage's own next tokens (and its ratio to fp32's);
  * mean and max |logit - fp32 logit|, mean KL(fp32 || variant) of the next-token distributions;
  * top-1 agreement: how often the variant's argmax equals fp32's.
llama-cpp-python (when importable) scores the same ids with the file's Q4_1 weights as they
are, so plait int4 (the same 4-bit grid, requantised from the dequantised weights) can be set
beside the engine a user would otherwise run. "plait int4 packed" is PyTorch's int4 kernel
with bf16 activations (`Engine.logits` at the int4 default); "plait int4 C" is the default's
generated tokens on AVX-512 CPUs (plait/backends/kernels/cpu_decode.c: int8 activations per
32-block, fp32 elsewhere), scored as one pass of generated tokens. Benchmarks are not tests:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "dev.jsonl"


def passages(encode, count: int, length: int) -> list[list[int]]:
    """`count` distinct SQuAD contexts of at least `length` tokens, cut to `length`."""
    seen, out = set(), []
    with SQUAD.open() as f:
        for line in f:
            context = json.loads(line)["context"]
            if context in seen:
                continue
            seen.add(context)
            ids = encode(context)
            if len(ids) >= length:
                out.append(ids[:length])
                if len(out) == count:
                    break
    return out


def plait_logits(quantize: str | None, dtype: str, texts: list[list[int]]) -> list[torch.Tensor]:
    from plait.backends.runtime.engine import Engine

    engine = Engine.load("smollm2-135m", dtype=dtype, quantize=quantize, prefix_cache=False)
    try:
        return [engine.logits(ids).float() for ids in texts]
    finally:
        engine.close()


def plait_generated_pass_logits(texts: list[list[int]]) -> tuple[list[torch.Tensor], bool]:
    """The default (int4) model scoring each passage as one pass of generated tokens: the path
    that sampled, forced and drafted tokens take (`cpu_decode`'s C pass where it runs), not the
    one `Engine.logits` takes. -> (logits, whether the C pass ran)."""
    from plait.backends.models.state import Batch
    from plait.backends.runtime.engine import Engine
    from plait.backends.runtime.state_pool import StatePool

    engine = Engine.load("smollm2-135m", prefix_cache=False)
    model = engine.model
    try:
        out = []
        for ids in texts:
            pool = StatePool(model.state_specs(torch.bfloat16), capacity=len(ids), max_length=len(ids))
            batch = Batch(pool, 0, torch.tensor([0]), logit_count=len(ids))
            with torch.inference_mode():
                out.append(model(torch.tensor([ids]), batch, last_only=True)[0].float())
        return out, getattr(model, "decode_kernel", None) is not None
    finally:
        engine.close()


def llama_cpp_logits(texts: list[list[int]], threads: int) -> list[torch.Tensor]:
    from llama_cpp import Llama

    from plait.backends.loading.registry import resolve

    _, gguf = resolve("smollm2-135m")
    llm = Llama(
        model_path=str(gguf), n_ctx=1024, n_threads=threads, n_batch=512, logits_all=True, verbose=False
    )
    out = []
    for ids in texts:
        llm.reset()
        llm.eval(ids)
        out.append(torch.tensor(llm.scores[: len(ids)], dtype=torch.float32))
    return out


def compare(name: str, got: list[torch.Tensor], ref: list[torch.Tensor], texts: list[list[int]]) -> dict:
    nll = tokens = agree = 0.0
    abs_sum = kl_sum = 0.0
    abs_max = 0.0
    for logits, base, ids in zip(got, ref, texts):
        logits, base = logits[:-1], base[:-1]
        target = torch.tensor(ids[1:])
        logp, base_logp = F.log_softmax(logits, -1), F.log_softmax(base, -1)
        nll += -logp.gather(-1, target[:, None]).sum().item()
        tokens += len(target)
        agree += (logits.argmax(-1) == base.argmax(-1)).sum().item()
        diff = (logits - base).abs()
        abs_sum += diff.mean(-1).sum().item()
        abs_max = max(abs_max, diff.max().item())
        kl_sum += (base_logp.exp() * (base_logp - logp)).sum(-1).sum().item()
    return {
        "name": name,
        "ppl": float(torch.tensor(nll / tokens).exp()),
        "agree": agree / tokens,
        "mean_abs": abs_sum / tokens,
        "max_abs": abs_max,
        "kl": kl_sum / tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--passages", type=int, default=24)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from plait.backends.runtime.engine import Engine

    tokenizer = Engine.load("smollm2-135m", prefix_cache=False)
    texts = passages(tokenizer.tokenizer.encode, args.passages, args.length)
    tokenizer.close()
    print(
        f"{len(texts)} SQuAD dev passages x {args.length} tokens = {len(texts) * (args.length - 1)} "
        "scored positions; reference: plait fp32 (the GGUF's Q4_1 weights, dequantised)\n"
    )
    ref = plait_logits(None, "float32", texts)
    rows = [compare("plait fp32", ref, ref, texts)]
    for name, quantize, dtype in [
        ("plait bf16", None, "bfloat16"),
        ("plait int8", "int8", "bfloat16"),
        ("plait int4 packed", "int4", "bfloat16"),
    ]:
        rows.append(compare(name, plait_logits(quantize, dtype, texts), ref, texts))
    generated, on_kernel = plait_generated_pass_logits(texts)
    rows.append(compare("plait int4 C" if on_kernel else "plait int4 gen", generated, ref, texts))
    if importlib.util.find_spec("llama_cpp") is not None:
        rows.append(compare("llama.cpp Q4_1", llama_cpp_logits(texts, args.threads), ref, texts))
    else:
        print("llama-cpp-python is not installed: its row is left out\n")
    base = rows[0]["ppl"]
    print(
        f"{'weights':<18}{'perplexity':>11}{'vs fp32':>9}{'top-1 agree':>13}"
        f"{'mean |dlogit|':>15}{'max |dlogit|':>14}{'KL(fp32||x)':>13}"
    )
    for r in rows:
        print(
            f"{r['name']:<18}{r['ppl']:>11.3f}{r['ppl'] / base:>8.3f}x{r['agree']:>12.1%}"
            f"{r['mean_abs']:>15.4f}{r['max_abs']:>14.3f}{r['kl']:>13.5f}"
        )


if __name__ == "__main__":
    main()
