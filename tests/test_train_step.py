"""mom.train's schedule, optimiser step and gradient accumulation, pinned down directly: the learning rate and
the weight-decay groups, the step against a clip-then-AdamW step computed by hand (fp64), accumulation over
micro-batches against one micro-batch of the whole global batch (one process), and the validation loss against
a loop over windows. Shipped sample data, CPU."""
import json
import math
import os

import pytest
import torch

from mom import data as mdata
from mom.train import Dist, TrainConfig, evaluate, lr_at, make_optimizer, no_decay, optimizer_step, train


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "sample"
    mdata.prepare("sample", str(d), "bpe:512", cache=str(d) + "-cache")
    return str(d)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_schedule_and_weight_decay_groups():
    tc = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4) and lr_at(9, tc) == pytest.approx(1e-3)
    assert lr_at(60, tc) == pytest.approx(0.55e-3) and lr_at(110, tc) == pytest.approx(1e-4)
    assert no_decay("wte.weight") and no_decay("bottom.0.ln_1.weight") and no_decay("chunks.0.attn_pool.ln_weight")
    assert no_decay("chunks.0.ffn_pool.c_fc_bias") and no_decay("chunks.0.attn_router.cell.bias_hh")
    assert not no_decay("chunks.0.ffn_pool.c_fc_weight") and not no_decay("bottom.0.attn.c_attn.weight")
    assert not no_decay("chunks.0.attn_router.cell.weight_ih")


class TwoGroups(torch.nn.Module):
    """A weight (decayed) and a bias (not decayed), as make_optimizer groups a model's parameters."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))


def _adamw_by_hand(params, grads_per_step, tc, clip):
    """Clip the global norm of each step's gradients to `clip` (torch's rule: scale min(1, clip / (norm +
    1e-6))), then AdamW (decoupled decay on the weight only; bias-corrected moments); returns the parameters
    and the norms before clipping."""
    p = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    norms = []
    for t, grads in enumerate(grads_per_step, start=1):
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
        norms.append(norm)
        scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
        for k in p:
            g = grads[k] * scale
            decay = tc.weight_decay if k == "weight" else 0.0
            p[k] = p[k] * (1 - tc.lr * decay)
            m[k] = tc.beta1 * m[k] + (1 - tc.beta1) * g
            v2[k] = tc.beta2 * v2[k] + (1 - tc.beta2) * g * g
            m_hat, v_hat = m[k] / (1 - tc.beta1 ** t), v2[k] / (1 - tc.beta2 ** t)
            p[k] = p[k] - tc.lr * m_hat / (v_hat.sqrt() + tc.eps)
    return p, norms


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_optimizer_step_is_clip_then_adamw(clip):
    """Two steps: the first one's gradient norm above the clip (clipped), the second's below it (not)."""
    model = TwoGroups()
    tc = TrainConfig(lr=1e-2, weight_decay=0.1, eps=1e-5, grad_clip=clip)
    opt = make_optimizer(model, tc)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = []
    for target in (3.0, 0.4):                         # global norms of the two steps' gradients
        g = {k: torch.randn_like(v) for k, v in start.items()}
        norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
        grads.append({k: x * (target / norm) for k, x in g.items()})
    got_norms = []
    for g in grads:
        for k, p in model.named_parameters():
            p.grad = g[k].clone()
        got_norms.append(optimizer_step(model, opt, clip))
        assert all(p.grad is None for p in model.parameters())  # cleared for the next step
    want, norms = _adamw_by_hand(start, grads, tc, clip)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[k], rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")
    if clip > 0:
        assert got_norms == pytest.approx(norms, rel=1e-12)
    else:
        assert all(math.isnan(n) for n in got_norms)


def test_tiny_clip_shrinks_the_update():
    """AdamW's first step moves each parameter by about lr whatever the gradient's scale, unless the gradient is
    far below eps: clipped to a norm of 1e-9, the update is lr * |g| / (|g| + eps), a ten-thousandth of lr."""
    model = TwoGroups()
    tc = TrainConfig(lr=1e-2, weight_decay=0.0, eps=1e-5, grad_clip=1e-9)
    opt = make_optimizer(model, tc)
    start = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer_step(model, opt, tc.grad_clip)
    moved = max(float((p.detach() - s).abs().max()) for p, s in zip(model.parameters(), start))
    assert 0 < moved <= 1e-4 * tc.lr, moved


def _rows(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_two_micro_batches_equal_one_batch_of_both(sample_data, tmp_path):
    """The same global batch of 8 sequences as one micro-batch of 8 or two of 4, in one process: the same
    losses, gradient norms and weights after the steps, to fp32 rounding (a GPT-2: routers' top-K would turn
    rounding into other picks)."""
    base = dict(model="tiny-gpt2", model_overrides={"n_bottom": 2}, data=sample_data, block_size=32, max_steps=3,
                warmup_steps=1, lr=3e-3, eval_interval=3, eval_windows=2, log_interval=1, ckpt_interval=0,
                progress=False, threads=1, global_batch_size=8)
    train(TrainConfig(**base, batch_size=8, out_dir=str(tmp_path / "one")))
    train(TrainConfig(**base, batch_size=4, out_dir=str(tmp_path / "two")))
    for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
        one, two = _rows(tmp_path / "one", key), _rows(tmp_path / "two", key)
        assert len(one) == len(two) >= 1 and two == pytest.approx(one, rel=1e-5), key
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "one" / "ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ckpt" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_validation_loss_is_the_mean_over_windows(sample_data):
    """evaluate() = the mean of the windows' LM losses, each window counted once (batches of 3 over 7
    windows: the last batch holds one)."""
    from mom import MoMConfig, MoMForCausalLM

    cfg = MoMConfig.from_name("tiny", backend="torch", n_positions=32)
    model = MoMForCausalLM(cfg)
    val = mdata.TokenData(sample_data, "val", 32)
    tc = TrainConfig(batch_size=3, eval_windows=7, progress=False)
    got = evaluate(model, val, tc, Dist(), torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        want = []
        for i in range(7):
            x = torch.from_numpy(val.window(i))[None]
            want.append(float(model(x, labels=x).lm_loss))
    assert got == pytest.approx(sum(want) / 7, rel=1e-6)
    assert model.training  # evaluate puts the model back in training mode


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=4, global_batch_size=10), r"global_batch_size=10 is not a multiple of batch_size=4 x world"),
    (dict(block_size=65), r"block_size=65 must be in \[2, n_positions=64\]"),
    (dict(model="no-such-preset"), r"model 'no-such-preset' is neither a preset"),
])
def test_settings_that_do_not_fit_the_run_are_refused_before_anything_is_written(sample_data, tmp_path, kw, match):
    from mom.train import RunError

    base = dict(model="tiny", data=sample_data, out_dir=str(tmp_path / "out"), max_steps=2, progress=False,
                threads=1)
    with pytest.raises(RunError, match=match):
        train(TrainConfig(**{**base, **kw}))
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunError, match="exists and is not a folder"):
        train(TrainConfig(**{**base, "out_dir": str(tmp_path / "file")}))
    assert (tmp_path / "file").read_text() == "not a folder"
