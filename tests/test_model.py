"""The model against its oracles: Hugging Face's GPT-2, the vanilla model it subsumes, the reference loop."""
import pytest
import torch

from helpers import (ROUTED_CASES as CASES, assert_close, assert_same_run, case_id, make_model, randomize_,
                     run_backend, small_config)
from mom import MoMConfig, MoMForCausalLM

transformers = pytest.importorskip("transformers")


def hf_gpt2(n_layer, n_embd=32, n_head=4, vocab=97, n_positions=40, n_inner=None):
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                                  n_positions=n_positions, n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    randomize_(model)  # HF initialises biases to 0 and LayerNorms to 1: perturb everything
    return model


def test_vanilla_from_gpt2_matches_hf():
    hf = hf_gpt2(3, n_inner=72)
    cfg = MoMConfig(vocab_size=97, n_positions=40, n_embd=32, n_head=4, n_inner=72, n_bottom=3)
    ours = MoMForCausalLM.from_gpt2(hf.state_dict(), cfg).eval()
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-5, f"relative error {rel:.3g} against HF GPT-2"


def test_from_gpt2_files(tmp_path):
    """A .safetensors and a .bin path load the same model as the state dict."""
    from safetensors.torch import save_file

    hf = hf_gpt2(2)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "g.safetensors"))
    torch.save(hf.state_dict(), tmp_path / "g.bin")
    cfg = MoMConfig(vocab_size=97, n_positions=40, n_embd=32, n_head=4, n_bottom=2)
    ids = torch.randint(0, 97, (1, 9))
    ref = MoMForCausalLM.from_gpt2(hf.state_dict(), cfg)(ids).logits
    for path in ("g.safetensors", "g.bin"):
        assert torch.equal(MoMForCausalLM.from_gpt2(str(tmp_path / path), cfg)(ids).logits, ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mom_subsumes_vanilla(backend):
    """Pools of one attention and one FFN module, depth 1, top-1, no SKIP == the GPT-2 of the same layers."""
    hf = hf_gpt2(6)
    sd = hf.state_dict()
    common = dict(vocab_size=97, n_positions=40, n_embd=32, n_head=4, backend=backend)
    vanilla = MoMForCausalLM.from_gpt2(sd, MoMConfig(**common, n_bottom=6)).double()
    # 1 bottom + 2 chunks x (1 routed step + anchor) + 1 top = 6 layers, in the same order
    routed_cfg = MoMConfig(**common, n_bottom=1, chunks=2, n_attn=1, n_ffn=1, depth=1, top_k=1, skip=False,
                           anchor=True, n_top=1)
    routed = MoMForCausalLM.from_gpt2(sd, routed_cfg).double()
    ids = torch.randint(0, 97, (2, 13))
    expected, got = vanilla(ids), routed(ids)
    assert_close("logits", got.logits, expected.logits, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(s.attn_ids, torch.zeros_like(s.attn_ids)) for c in got.routing for s in c)
    assert_close("logits vs HF", got.logits, hf.double()(ids).logits, rtol=1e-10, atol=1e-10)


def test_from_gpt2_layer_map_with_unequal_pools():
    """docs/method.md's layer map with n_attn = 2 < n_ffn = 3 (M = 3): per chunk, the next M layers give attention
    module j (ln_1 + attn) for j < 2 and FFN module j (ln_2 + mlp) for j < 3, then the anchor; bottom first, top
    last (written out here layer by layer)."""
    cfg = small_config(n_attn=2, n_ffn=3, top_k=1, renormalize=False, depth=2)    # 1 + 2 x (3 + 1) + 1 = 10
    assert cfg.source_layers == 10
    van = randomize_(MoMForCausalLM(cfg.vanilla()))
    sd = van.state_dict()
    mom = MoMForCausalLM.from_gpt2(sd, cfg)
    got = mom.state_dict()
    layer = lambda i, name: sd[f"bottom.{i}.{name}"]  # noqa: E731
    assert torch.equal(got["bottom.0.attn.c_attn.weight"], layer(0, "attn.c_attn.weight"))
    for c, first in ((0, 1), (1, 5)):                                             # chunk c: layers first..first+3
        for j in range(3):
            if j < 2:
                attn = f"chunks.{c}.attn_pool"
                assert torch.equal(got[f"{attn}.c_attn_weight"][j], layer(first + j, "attn.c_attn.weight"))
                assert torch.equal(got[f"{attn}.ln_weight"][j], layer(first + j, "ln_1.weight"))
            assert torch.equal(got[f"chunks.{c}.ffn_pool.c_fc_weight"][j], layer(first + j, "mlp.c_fc.weight"))
            assert torch.equal(got[f"chunks.{c}.ffn_pool.ln_bias"][j], layer(first + j, "ln_2.bias"))
        assert torch.equal(got[f"chunks.{c}.anchor.mlp.c_proj.weight"], layer(first + 3, "mlp.c_proj.weight"))
    assert torch.equal(got["top.0.ln_2.weight"], layer(9, "ln_2.weight"))


def test_from_gpt2_parameter_count():
    """GPT-2's parameters + the routers' - the dropped modules (tiny: n_attn 3 < n_ffn 4, one attention
    module dropped per chunk)."""
    cfg = MoMConfig.from_name("tiny")
    van = cfg.vanilla()
    hf = hf_gpt2(van.n_bottom, n_embd=cfg.n_embd, n_head=cfg.n_head, vocab=cfg.vocab_size,
                 n_positions=cfg.n_positions)
    model = MoMForCausalLM.from_gpt2(hf.state_dict(), cfg)
    D = cfg.n_embd
    gpt2 = sum(p.numel() for n, p in hf.named_parameters())  # lm_head is tied (not counted twice)
    routers = sum(p.numel() for n, p in model.named_parameters() if "_router." in n)
    attn_module = 2 * D + D * 3 * D + 3 * D + D * D + D
    dropped = cfg.chunks * (cfg.n_modules - cfg.n_attn) * attn_module
    assert model.num_parameters() == gpt2 + routers - dropped


@pytest.mark.parametrize("name,base", [("mom-small", "gpt2"), ("mom-medium", "gpt2-medium"),
                                       ("mom-large-deep", "gpt2-large"), ("mom-large-efficient", "gpt2-large")])
def test_preset_parameter_counts(name, base):
    """Routed presets have their GPT-2's parameters plus the routers' (counted on the meta device)."""
    with torch.device("meta"):
        mom = MoMForCausalLM(MoMConfig.from_name(name))
        gpt = MoMForCausalLM(MoMConfig.from_name(base))
    routers = sum(p.numel() for n, p in mom.named_parameters() if "_router." in n)
    assert mom.num_parameters() == gpt.num_parameters() + routers
    assert MoMConfig.from_name(name).vanilla().source_layers == MoMConfig.from_name(base).graph_depth


def test_gpt2_preset_sizes():
    """124.4M / 354.8M / 774.0M parameters (tied head), as GPT-2 small / medium / large."""
    with torch.device("meta"):
        sizes = [MoMForCausalLM(MoMConfig.from_name(n)).num_parameters() for n in ("gpt2", "gpt2-medium",
                                                                                  "gpt2-large")]
    assert [round(s / 1e5) / 10 for s in sizes] == [124.4, 354.8, 774.0]


def test_deep_and_efficient_presets_meet_the_papers_bounds():
    deep, eff = MoMConfig.from_name("mom-large-deep"), MoMConfig.from_name("mom-large-efficient")
    assert deep.graph_depth >= 50 and deep.source_layers == 36
    assert eff.graph_depth <= 14 and eff.top_k > 1 and eff.source_layers == 36


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_matches_reference_fp64(case):
    cfg = small_config(**case)
    model = make_model(cfg, torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    assert_same_run(run_backend(model, ids, "torch"), run_backend(model, ids, "reference"), 1e-10, 1e-10)


@pytest.mark.parametrize("router", ["gru", "mlp"])
def test_torch_backend_matches_reference_fp32(router):
    cfg = small_config(router=router, top_k=3, n_attn=4, n_ffn=3)
    model = make_model(cfg, torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert_same_run(run_backend(model, ids, "torch"), run_backend(model, ids, "reference"), 1e-5, 1e-5)


def test_router_gets_gradient_from_lm_loss_only_when_weights_carry_it():
    """With top-1 and renormalised weights (g == 1) the LM loss gives the router nothing; un-renormalised
    weights (renormalize=False) give it a gradient."""
    for renorm, expect in ((True, False), (False, True)):
        cfg = small_config(top_k=1, renormalize=renorm, aux_loss_coef=0.0)
        model = make_model(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 7))
        model(ids, labels=ids).loss.backward()
        g = model.chunks[0].ffn_router.head.weight.grad
        assert (g is not None and g.abs().max() > 1e-12) == expect  # w / w leaves ~1e-20 round-off


def test_all_skip_step_leaves_residual_unchanged_and_zero_qkv():
    """A token whose picks are all SKIP: q = k = v = 0, no attention or FFN output at that step."""
    cfg = small_config(top_k=1, chunks=1, depth=1, anchor=False, n_bottom=0, n_top=0)
    model = make_model(cfg)
    chunk = model.chunks[0]
    with torch.no_grad():  # make every router pick the SKIP slot
        for r in (chunk.attn_router, chunk.ffn_router):
            r.head.weight.zero_()
            r.head.bias.zero_()
            r.head.bias[-1] = 10.0
    x = torch.randn(2, 5, cfg.n_embd, dtype=torch.float64)
    for backend in ("reference", "torch"):
        model.set_backend(backend)
        out = chunk(x)
        assert torch.equal(out.hidden_states, x)
        assert (out.routing[0].attn_ids == cfg.n_attn).all()


def test_deterministic_runs():
    cfg = small_config()
    model = make_model(cfg, torch.float32).set_backend("torch")
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    a, ga = run_backend(model, ids, "torch")
    b, gb = run_backend(model, ids, "torch")
    assert torch.equal(a.logits, b.logits) and all(torch.equal(ga[n], gb[n]) for n in ga)


def test_save_load_round_trip(tmp_path):
    cfg = small_config(backend="torch")
    model = make_model(cfg, torch.float32)
    model.save_pretrained(str(tmp_path / "ckpt"))
    loaded = MoMForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    assert loaded.config == cfg
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_state_dict_keys_do_not_depend_on_backend():
    keys = [set(MoMForCausalLM(small_config(backend=b)).state_dict()) for b in ("reference", "torch", "auto")]
    assert keys[0] == keys[1] == keys[2]


def test_checkpointed_chunks_give_the_same_gradients():
    cfg = small_config(backend="torch")
    model = make_model(cfg, torch.float64).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    plain, g_plain = run_backend(model, ids, "torch")
    model.config = model.config.replace(checkpoint_chunks=True)
    ckpt, g_ckpt = run_backend(model, ids, "torch")
    assert_close("loss", ckpt.loss, plain.loss, 1e-12, 1e-12)
    for n in g_plain:
        assert_close(f"grad {n}", g_ckpt[n], g_plain[n], 1e-10, 1e-12)


def test_mom_layer_drops_into_another_model():
    """MoMLayer as the middle of someone else's network: [B, T, D] in and out, trains with its aux loss."""
    from mom import MoMLayer

    cfg = MoMConfig(n_embd=16, n_head=2, n_bottom=0, chunks=1, n_attn=3, n_ffn=3, depth=2, top_k=2,
                    router_dim=8, backend="torch")
    net = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 16), "mom": MoMLayer(cfg),
                               "head": torch.nn.Linear(16, 10)})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ids = torch.randint(0, 10, (4, 12))
    losses = []
    for _ in range(15):
        out = net["mom"](net["emb"](ids))
        assert out.hidden_states.shape == (4, 12, 16) and len(out.routing) == 2
        loss = torch.nn.functional.cross_entropy(net["head"](out.hidden_states).flatten(0, 1), ids.flatten())
        opt.zero_grad()
        (loss + cfg.aux_loss_coef * out.aux_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pattern", ["module_1_empty", "all_skip", "one_token"])
def test_torch_routed_ops_edge_cases_match_reference(pattern, weighted):
    """The torch ops' hand-written backward on empty modules, all-SKIP picks and T = 1 (fp64, every grad)."""
    from mom import routed

    E, D, F, K = 3, 7, 11, 2
    T = 1 if pattern == "one_token" else 9
    ids = torch.stack([torch.randperm(E + 1)[:K] for _ in range(T)])      # distinct picks per token
    if pattern == "module_1_empty":
        ids[ids == 1] = E
    if pattern == "all_skip":
        ids[:] = E
    mk = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w, b, g, beta = mk(T, D), mk(E, D, 5), mk(E, 5), mk(E, D), mk(E, D)
    w1, b1, w2, b2, gw = mk(E, D, F), mk(E, F), mk(E, F, D), mk(E, D), mk(T, K)
    weights = gw if weighted else None
    for name, args in [("routed_linear", (x, w, b, ids, weights, g, beta)),
                       ("routed_ffn", (x, g, beta, w1, b1, w2, b2, ids, gw))]:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        outs = {}
        for impl in ("reference", "torch"):
            y = getattr(routed, f"{impl}_{name}")(*args)
            if not y.requires_grad:  # the loop touches no module when every pick is SKIP: a constant 0
                outs[impl] = (y, [None] * len(leaves))
                continue
            outs[impl] = (y, torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype)
                                                  .view_as(y)).sum(), leaves, allow_unused=True))
        assert_close(f"{name} output", outs["torch"][0], outs["reference"][0], 1e-12, 1e-12)
        for i, (a, e) in enumerate(zip(outs["torch"][1], outs["reference"][1])):
            e = torch.zeros_like(leaves[i]) if e is None else e
            a = torch.zeros_like(leaves[i]) if a is None else a
            assert_close(f"{name} grad {i}", a, e, 1e-12, 1e-12)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_autocast_bf16_trains_fp32_parameters(backend):
    """Under torch.autocast(bf16) the routed ops run in bf16, the fp32 parameters get fp32 gradients, and
    the loss stays near the fp32 loss."""
    cfg = MoMConfig.from_name("tiny", backend=backend)
    model = MoMForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    expected = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert model.chunks[0].ffn_pool.c_fc_weight.grad.abs().sum() > 0
    assert abs(out.loss.item() - expected.item()) < 0.05


def test_chunk_output_tensors_are_visible_to_pytree():
    """FSDP2 hooks a sharded chunk's backward all-gather onto the tensors it finds in the chunk's output with
    torch's pytree; torch 2.11 did not look inside plain dataclasses, and the backward then read freed
    parameters. MoMLayerOutput and StepRouting are pytree nodes, so every tensor in them is found."""
    import torch.utils._pytree as pytree

    from mom.layer import MoMLayerOutput, StepRouting

    h, aux = torch.randn(2, 3, 4), torch.tensor(0.5)
    r = StepRouting(*(torch.randn(2, 3, 2) for _ in range(4)))
    leaves = pytree.tree_leaves(MoMLayerOutput(h, [r], aux))
    for t in (h, aux, r.attn_ids, r.attn_weights, r.ffn_ids, r.ffn_weights):
        assert any(x is t for x in leaves)


def test_lm_loss_is_the_next_token_cross_entropy():
    """lm_loss = the mean over positions t < T - 1 whose next label is not -100 of -log softmax(logits[t])
    [labels[t + 1]] (a loop here, fp64; the model takes the cross-entropy in fp32); loss = lm_loss +
    aux_loss_coef * aux_loss."""
    cfg = small_config(backend="torch")
    model = make_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, 3] = labels[1, 8] = -100
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(8) if labels[b, t + 1] != -100]
    want = torch.stack(terms).mean()
    assert len(terms) == 14
    assert_close("lm_loss", out.lm_loss, want, 1e-6, 1e-6)
    assert_close("loss", out.loss, want + cfg.aux_loss_coef * out.aux_loss, 1e-6, 1e-6)
