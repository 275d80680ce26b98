"""Generation: a static KV cache, left-padded batches, sampling, stop tokens, decode steps replayed from a CUDA graph.

    prompt [B, T] (+ attention_mask, left padding) -> prefill into a StaticCache of max_length positions
    -> loop: pick the next token from the last logits (greedy or sampled) -> one decode step [B, 1] -> ...

Why a static cache: the list-of-(k, v) cache of `MoMForCausalLM.forward` grows by concatenation, so every step
has a new shape and copies the whole cache. A MoM step has one KV cache per routed step (not per layer), so a
MoM model carries graph_depth caches; `mom.cache.StaticCache` preallocates each one for max_length positions and
writes the new keys in place at positions held in a device tensor. A decode step then has fixed shapes (cache,
one token per row, a position tensor) and reads nothing back to the host, so it can be captured once in a CUDA
graph and replayed per token (`cuda_graph=True`, backend "triton" for routed models: the torch backend's routing
plans read counts back to the host). On the CPU the same step runs eagerly.

Left padding: rows of different prompt lengths share one batch; attention_mask [B, T] marks real tokens (1) and
padding (0, on the left). Position ids count real tokens only and padding is never attended, so each row
generates exactly what it would alone (tests/test_decode_static.py checks it).

Sampling (what users of transformers' generate expect): do_sample (default: temperature > 0), temperature,
top_k, top_p (nucleus), a seeded torch.Generator; greedy = argmax. eos_token_id (an int or a list): a row that
emitted one gets pad_token_id (default: the first eos id) from then on; generation stops when every row has
finished (checked every `stop_check_every` tokens, outside the step: the only host read of the loop).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .cache import StaticCache

__all__ = ["generate", "sample_next", "DecodeStep"]


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token of each row from logits [B, V] -> [B] long. Greedy (argmax) unless do_sample; else
    softmax(logits / temperature) restricted to the top_k largest and to the smallest set whose probability
    reaches top_p (the most likely token always stays), sampled with `generator`."""
    logits = logits.float()
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]                          # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)                  # [B, V]
        probs = torch.softmax(srt, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p                          # mass before it already >= top_p
        logits = logits.scatter(1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


class DecodeStep:
    """One decode step [B] next tokens -> [B, V] last logits, over a StaticCache: the model's forward without
    host checks (`_forward`), which writes the cache in place and advances its position tensors. With
    cuda_graph=True on a CUDA device it is captured once (after a warm-up whose cache writes are undone) and
    replayed per token; otherwise (CPU, or cuda_graph=False) the same code runs eagerly."""

    def __init__(self, model, cache: StaticCache, cuda_graph: bool = False, warmup: int = 2):
        self.model, self.cache = model, cache
        self.tok = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.device)   # [B, 1] step input
        self.graph = None
        if cuda_graph and cache.device.type == "cuda":
            _check_capturable(model)
            saved = (cache.length.clone(), cache.n_valid.clone(), cache.key_mask.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):          # compiles kernels, fills allocator caches off the capture stream
                for _ in range(warmup):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            for t, s in zip((cache.length, cache.n_valid, cache.key_mask), saved):  # undo the warm-up's steps
                t.copy_(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()

    def _run(self) -> torch.Tensor:
        out = self.model._forward(self.tok, None, self.cache, False, None, 0, 1, balance=False)  # no aux loss
        return out.logits[:, -1]                                                          # [B, V]

    def __call__(self, next_tokens: torch.Tensor) -> torch.Tensor:
        if self.cache.seen + 1 > self.cache.max_length:
            raise ValueError(f"decode step: the static cache is full (max_length={self.cache.max_length})")
        self.tok.copy_(next_tokens.view(-1, 1))
        self.cache.seen += 1
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


def _check_capturable(model):
    cfg = model.config
    if cfg.chunks > 0:
        from .routed import triton_available

        backend = cfg.backend
        if backend not in ("triton", "auto") or (backend == "auto" and not triton_available()):
            raise ValueError(f"generate(cuda_graph=True): config.backend={backend!r} cannot be captured in a CUDA "
                             f"graph (its routing plans read counts back to the host); use backend 'triton'")
        import mom_kernels.checks as checks

        if checks._CHECK_IDS:
            raise ValueError("generate(cuda_graph=True): host id checks are on (mom_kernels.set_check_ids(True)); "
                             "they read device values and cannot be captured")


def _check_attention_mask(attention_mask, input_ids):
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor of 0/1, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")
    if attention_mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be bool or integer (0/1), got {attention_mask.dtype}")
    m = attention_mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if bool((m.sum(1) == 0).any()):
        raise ValueError(f"attention_mask: row(s) {(m.sum(1) == 0).nonzero().flatten().tolist()} have no token")
    if bool((m[:, 1:] < m[:, :-1]).any()):
        raise ValueError("attention_mask must be left padding (0s, then 1s, per row); right padding or holes "
                         "would put generated tokens after padding")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: Optional[int] = None, *,
             max_length: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None,
             do_sample: Optional[bool] = None, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Union[int, Sequence[int], None] = None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             cuda_graph: bool = False, stop_check_every: int = 8) -> torch.Tensor:
    """Generate after input_ids [B, T] (left-padded when attention_mask [B, T] has 0s). Returns [B, T + n]:
    n = max_new_tokens (or max_length - T), fewer when every row hit an eos_token_id. See the module docstring."""
    cfg = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, prompt_len] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    B, T = input_ids.shape
    if T > cfg.n_positions:
        raise ValueError(f"prompt of {T} tokens is longer than config.n_positions={cfg.n_positions}")
    if max_new_tokens is None and max_length is None:
        raise ValueError("generate: give max_new_tokens or max_length")
    if max_new_tokens is not None and max_length is not None:
        raise ValueError("generate: give max_new_tokens or max_length, not both")
    if max_length is not None:
        if max_length < T:
            raise ValueError(f"max_length={max_length} is shorter than the prompt ({T} tokens)")
        max_new_tokens = max_length - T
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if T + max_new_tokens > cfg.n_positions:
        raise ValueError(f"{T} prompt + {max_new_tokens} new tokens exceed config.n_positions={cfg.n_positions} "
                         f"(max_length)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None:
        _check_attention_mask(attention_mask, input_ids)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if any(not 0 <= e < cfg.vocab_size for e in eos):
        raise ValueError(f"eos_token_id {eos} outside the vocabulary [0, {cfg.vocab_size})")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    do_sample = temperature > 0 if do_sample is None else bool(do_sample)
    if max_new_tokens == 0:
        return input_ids.clone()

    device = input_ids.device
    cache = StaticCache(cfg, B, T + max_new_tokens, model.wte.weight.dtype, device)
    out = model(input_ids, past_key_values=cache, attention_mask=attention_mask, logits_to_keep=1)  # prefill
    logits = out.logits[:, -1]                                                          # [B, V]
    step = DecodeStep(model, cache, cuda_graph=cuda_graph) if max_new_tokens > 1 else None
    seqs = torch.empty(B, T + max_new_tokens, dtype=input_ids.dtype, device=device)
    seqs[:, :T] = input_ids
    eos_t = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = max_new_tokens
    for i in range(max_new_tokens):
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)        # [B]
        if eos_t is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished |= torch.isin(nxt, eos_t)
        seqs[:, T + i] = nxt.to(seqs.dtype)
        if i == max_new_tokens - 1:
            break
        if eos_t is not None and (i + 1) % stop_check_every == 0 and bool(finished.all()):  # one host read
            n = i + 1
            break
        logits = step(nxt)
    if eos_t is not None and bool(finished.all()):  # stop right after the last row's first stop token
        first = torch.isin(seqs[:, T:T + n], eos_t).int().argmax(dim=1)                    # [B]
        n = int(first.max()) + 1
    return seqs[:, :T + n]


# ----------------------------------------------------------------------------------------------------------
# command line: sample text from a trained checkpoint with its run's tokenizer
# ----------------------------------------------------------------------------------------------------------
def _checkpoint_folder(path: str) -> str:
    """A run folder (out_dir of mom.train) or its ckpt/ folder -> the folder holding config.json."""
    import os

    if os.path.isdir(os.path.join(path, "ckpt")):
        return os.path.join(path, "ckpt")
    if not os.path.isdir(path):
        raise ValueError(f"--ckpt {path}: no such folder (give a run folder of mom.train or its ckpt/)")
    return path


def main(argv=None) -> int:
    """`python -m mom.generate --ckpt runs/p2 --data data/shakespeare --prompt "..."`: prints the samples."""
    import sys

    from .cli import ArgumentParser

    p = ArgumentParser(
        prog="python -m mom.generate",
        description="Sample text from a trained MoM or GPT-2 checkpoint (a run folder of mom.train or its ckpt/), "
                    "tokenised with the tokenizer of the data folder the run was trained on.")
    p.add_argument("--ckpt", required=True, help="run folder (out_dir of mom.train) or its ckpt/ folder")
    p.add_argument("--data", required=True, help="the prepared data folder the run trained on (its tokenizer)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate per sample (default: 50)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the same prompt (default: 1)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample within the smallest set of tokens whose probability reaches p (default: off)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1 or a.num_samples < 1:
        p.error(f"--max-new-tokens {a.max_new_tokens} --num-samples {a.num_samples}: both must be >= 1")
    try:
        from .data import load_tokenizer
        from .model import MoMForCausalLM

        tok = load_tokenizer(a.data)
        model = MoMForCausalLM.from_pretrained(_checkpoint_folder(a.ckpt)).to(a.device).eval()
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"--data {a.data}: its tokenizer has {tok.vocab_size} ids, the checkpoint's model "
                             f"{model.config.vocab_size}: not the data this run trained on")
        ids = tok.encode(a.prompt) or [tok.eot_id]
        prompt = torch.tensor([ids] * a.num_samples, device=a.device)
        gen = torch.Generator(device=a.device).manual_seed(a.seed)
        with torch.no_grad():
            out = generate(model, prompt, a.max_new_tokens, do_sample=not a.greedy, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, eos_token_id=tok.eot_id, generator=gen)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"python -m mom.generate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for i, row in enumerate(out.tolist()):
        text = tok.decode([t for t in row[len(ids):] if t != tok.eot_id])
        print(f"--- sample {i + 1}\n{a.prompt}{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
