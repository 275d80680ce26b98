"""torch.compile(fullgraph=True) traces the model: training steps and cached decoding match eager."""
import copy

import pytest
import torch

from helpers import cached_logits
from mom import MoMConfig, MoMForCausalLM


def _train(model, batches, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("backend,compiler,overrides", [
    ("torch", "inductor", {}),                                     # the whole tiny preset through Inductor
    ("reference", "aot_eager", dict(chunks=1, depth=2)),           # the loop's ops: traced, not code-generated
])
def test_compiled_training_matches_eager(backend, compiler, overrides):
    torch._dynamo.reset()
    cfg = MoMConfig.from_name("tiny", backend=backend, **overrides)
    eager = MoMForCausalLM(cfg)
    compiled_model = copy.deepcopy(eager)
    batches = [torch.randint(0, cfg.vocab_size, (2, 16))] * 3  # one batch, learnable in 3 steps
    expected = _train(eager, batches, 3)
    got = _train(torch.compile(compiled_model, fullgraph=True, backend=compiler), batches, 3)
    assert expected[-1] < expected[0]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        # atol 1e-4: Adam turns a near-zero gradient's round-off into a step of up to lr (3e-3)
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-4, msg=lambda m: f"{n}: {m}")


def test_compiled_cached_decoding_matches_eager():
    torch._dynamo.reset()
    cfg = MoMConfig.from_name("tiny", backend="torch", chunks=1, depth=2, n_bottom=0)
    model = MoMForCausalLM(cfg).eval()
    step = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)  # Dynamo capture, no codegen
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        logits = cached_logits(step, ids, 6)[0]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
