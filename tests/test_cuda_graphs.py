"""mom.cuda_graphs.GraphedTrainStep: a captured forward + backward replayed on new batches gives the eager loss
and gradients (CUDA only); on any machine, what cannot be captured is refused with a message saying why."""
import pytest
import torch

from mom import MoMConfig, MoMForCausalLM
from mom.cuda_graphs import GraphedTrainStep


def test_refuses_what_cannot_be_captured():
    model = MoMForCausalLM(MoMConfig.from_name("tiny", backend="torch"))
    ids = torch.randint(0, 512, (2, 8))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        GraphedTrainStep(model, ids)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='torch' cannot be captured"):
            GraphedTrainStep(model.cuda(), ids.cuda())


class _LooksCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: gets past the device check to the checks after it, which must refuse
    before anything touches CUDA."""

    @property
    def is_cuda(self):
        return True


def test_refuses_uncapturable_backends_and_host_checks_before_any_cuda_call():
    import mom_kernels.checks as checks

    ids = torch.randint(0, 512, (2, 8)).as_subclass(_LooksCuda)
    for backend in ("torch", "reference"):                     # their plans read counts back to the host
        model = MoMForCausalLM(MoMConfig.from_name("tiny", backend=backend))
        with pytest.raises(ValueError, match=f"backend='{backend}' cannot be captured"):
            GraphedTrainStep(model, ids)
    model = MoMForCausalLM(MoMConfig.from_name("tiny", backend="triton"))
    old = checks._CHECK_IDS
    checks.set_check_ids(True)
    try:
        with pytest.raises(ValueError, match="host id checks are on"):
            GraphedTrainStep(model, ids)
    finally:
        checks.set_check_ids(old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_replays_match_eager():
    torch.manual_seed(0)
    cfg = MoMConfig.from_name("tiny", backend="triton")
    model = MoMForCausalLM(cfg).cuda()
    batches = [torch.randint(0, cfg.vocab_size, (4, 32), device="cuda") for _ in range(3)]
    step = GraphedTrainStep(model, batches[0])
    params = [p for p in model.parameters() if p.requires_grad]
    for ids in batches:  # new tokens: new picks, new module loads every replay
        loss = step(ids).clone()
        grads = [p.grad.clone() for p in params]
        graph_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        want = model(ids, labels=ids).loss
        want.backward()
        torch.testing.assert_close(loss, want.detach(), rtol=1e-4, atol=1e-5)
        for g, p in zip(grads, params):
            torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-5)
        for p, g in zip(params, graph_grads):  # hand the graph's grad tensors back to the parameters
            p.grad = g
