"""mom.memory: the forward-memory measurement sees what it should (CPU: peak RSS of a fresh process).

Run: python -m pytest -q tests/test_memory.py   (about 15 s on 2 cores: three small worker processes)
"""
import pytest
import torch

from mom import MoMConfig
from mom.memory import PeakRSS, Spec, cpu_peak_supported, measure_isolated

pytestmark = pytest.mark.skipif(not cpu_peak_supported(), reason="needs /proc/self/clear_refs (Linux)")

# Large enough that every activation is a >= 64 KiB block (mmapped, so it shows in RSS): N = 4 x 128 tokens.
# RSS is exact to about 1 MiB: the kernel folds each thread's RSS count into the process's every 64 page faults.
SLACK = 2 ** 20
CFG = MoMConfig.from_name("tiny", n_embd=64, vocab_size=2048, n_positions=128, router_dim=16)


def test_peak_rss_sees_an_allocation():
    n = 16 * 2 ** 20  # 64 MiB of float32: above glibc's largest mmap threshold, so its own mapping
    with PeakRSS() as p:
        t = torch.ones(n)
        del t
    assert 0.95 * 4 * n <= p.growth <= 1.1 * 4 * n + 8 * 2 ** 20, p.growth


def test_prefill_peak_bounds():
    """Peak >= what is alive at the end (weights, logits, caches); and not wildly above it."""
    B, T = 4, 128
    r = measure_isolated(Spec(CFG.to_dict(), B, T, "prefill", repeats=0))
    m = r["memory"]
    D, V = CFG.n_embd, CFG.vocab_size
    assert m["method"] == "cpu.VmHWM"
    assert m["cache_bytes"] == CFG.n_cache_layers * 2 * B * T * D * 4
    assert m["weights_bytes"] == r["parameters"] * 4
    alive_at_end = m["weights_bytes"] + B * T * V * 4 + m["cache_bytes"]
    assert alive_at_end - SLACK <= m["peak_bytes"] <= 2.0 * alive_at_end, (m, alive_at_end)


def test_decode_and_train_baselines():
    """Decode: the cache passed in is part of the baseline; train: activations kept >> the prefill's."""
    B, T = 8, 128
    dec = measure_isolated(Spec(CFG.to_dict(), B, T, "decode", repeats=0))["memory"]
    cache_in = CFG.n_cache_layers * 2 * B * (T - 1) * CFG.n_embd * 4
    assert dec["baseline_bytes"] >= dec["weights_bytes"] + cache_in
    assert dec["cache_bytes"] == cache_in * T // (T - 1)
    assert dec["peak_bytes"] - dec["baseline_bytes"] >= dec["cache_bytes"] - SLACK  # the new caches (torch.cat)
    train = measure_isolated(Spec(CFG.to_dict(), B, T, "train", repeats=0))["memory"]
    assert train["cache_bytes"] == 0
    assert train["peak_bytes"] - train["weights_bytes"] > 3 * B * T * CFG.vocab_size * 4  # logits, log-softmax, ...


def test_decode_weight_bytes_counts_each_picked_module_once():
    """Everything outside the pools, plus per routed step the modules some token picked (SKIP reads nothing),
    counted here by a loop over tokens and picks."""
    from mom import MoMForCausalLM
    from mom.memory import decode_weight_bytes

    cfg = MoMConfig.from_name("tiny", n_embd=32, n_head=2, vocab_size=64, backend="torch")
    torch.manual_seed(0)
    model = MoMForCausalLM(cfg).eval()
    with torch.no_grad():
        routing = model(torch.randint(0, 64, (3, 1))).routing
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)
    want = 0
    for name, p in model.named_parameters():
        if "_pool." not in name:
            want += nbytes([p])
    for chunk, steps in zip(model.chunks, routing):
        for pool, key in ((chunk.attn_pool, "attn_ids"), (chunk.ffn_pool, "ffn_ids")):
            for step in steps:
                seen = set()
                for row in getattr(step, key).reshape(-1, cfg.top_k).tolist():
                    seen.update(m for m in row if m < pool.n_modules)
                want += len(seen) * nbytes(pool.parameters()) // pool.n_modules
    assert decode_weight_bytes(model, routing) == want
    vanilla = MoMForCausalLM(cfg.vanilla())
    assert decode_weight_bytes(vanilla, []) == nbytes(vanilla.parameters())


@pytest.mark.parametrize("overrides", [dict(), dict(shared_slots=True)])
def test_no_skip_measurement_picks_no_skip_slot(overrides):
    """routing="no-skip" (force_no_skip_, the efficiency report's default): no router picks any SKIP slot (the
    one per router, or shared_slots' several), so the forward's counted FLOPs are the no-SKIP expectation.
    The routers as initialised ("init") do pick SKIP on this config, so the check can fail."""
    from mom import flops
    from mom.memory import _measure_here

    cfg = MoMConfig.from_name("tiny", backend="torch", **overrides)
    B, T = 2, 16
    init = _measure_here(Spec(cfg.to_dict(), B, T, "prefill", routing="init", repeats=0))
    assert init["skip_share"] > 0
    r = _measure_here(Spec(cfg.to_dict(), B, T, "prefill", routing="no-skip", repeats=0))
    assert r["skip_share"] == 0
    assert r["flops"] == flops.expected(cfg, B, T).as_dict()
