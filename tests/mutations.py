"""Mutation check: do the tests catch the bugs that matter?

    python tests/mutations.py                     # every mutation (long: see DEVELOPERS.md)
    python tests/mutations.py --list              # by file: names, bugs, the tests each one runs; per-module counts
    python tests/mutations.py --only router_temperature_ignored plan_torch_offsets_shifted
    python tests/mutations.py --rev HEAD          # the last commit, not the working tree

For each mutation: copy the repository's files (`git ls-files`, tracked and untracked-but-not-ignored, as
they are in the working tree; or a commit's with --rev) into a temporary directory, make one literal text
substitution there (file, old -> new), run that mutation's tests in the copy (files or pytest node ids
file::test, in the order given: `pytest -x -q`, PYTHONPATH = the copy) and report KILLED (a test failed: the
first failing test is named) or SURVIVED (every test passed: the tests do not notice this bug). Exit code 1
if any mutation survived or could not be applied.

Coverage: at least two mutations for every module of mom/ (its __init__ only re-exports) and for the
benchmarks' counting code (COUNTING_CODE); --list ends with the count per module and names any below two.

A substitution whose `old` text is not found exactly once in its file is an error, not a skip: a refactor
that moves the text must update the mutation here, never disable it silently. A test file that does not
exist is left out with a note (some are still being written). Before the mutations, the same test files
run once on the unmutated copy; tests that fail there are deselected in every mutation run (and listed),
so a mutation is only counted as KILLED by a test that passes without it. Each run also records where
`mom` / `mom_kernels` were imported from and checks that it was the copy, not the checkout.

Not part of CI: a whole run took 44 minutes on 2 shared cores at commit 4a24b31 (138 mutations, all killed:
a 9-minute baseline, then most within seconds; a survivor runs its test files to the end, minutes each under
the Triton interpreter); the 31 entries added after it (the Llama family, capacity routing, the drop-in block,
the command line, the checkpoint format) took about 10 minutes, all killed. Run it before a release and after changing
the tests. It never edits the checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 1800  # one mutation's test run; a hang counts as KILLED (timeout)

# Test files per area, fastest first (with -x the first failure ends the run).
ROUTING_TESTS = ["tests/test_oracle_routing.py", "tests/test_kernels_route.py", "tests/test_oracle_step.py"]
STEP_TESTS = ["tests/test_oracle_step.py", "tests/test_model.py"]
PLAN_TESTS = ["tests/test_kernels_routing.py", "tests/test_kernels_route.py", "tests/test_kernels_multitile.py"]
KERNEL_TESTS = ["tests/test_kernels_routed_linear.py", "tests/test_kernels_routed_ffn.py",
                "tests/test_kernels_multitile.py", "tests/test_kernels_weight_grad.py",
                "tests/test_kernels_residual.py", "tests/test_kernels_gemm_modes.py"]
LN_FUSED_TESTS = ["tests/test_kernels_weight_grad.py", "tests/test_kernels_multitile.py"]
TORCH_TESTS = ["tests/test_oracle_step.py", "tests/test_model.py"]
GATHER_TESTS = ["tests/test_kernels_gathers.py"] + KERNEL_TESTS
TRAIN_TESTS = ("tests/test_train_step.py",)
DATA_TESTS = ("tests/test_data.py",)
IO_TESTS = ("tests/test_hardening_io.py",)
GENERATE_TESTS = ("tests/test_decode_static.py", "tests/test_generate.py")
STOPS = "tests/test_decode_static.py::test_every_row_stops_output_ends_after_the_last_rows_first_stop"
MASKS = "tests/test_decode_static.py::test_padding_masks_and_positions_against_loops"
FLOPS_TESTS = ("tests/test_flops.py",)
TOKENIZER_TESTS = ("tests/test_tokenizer.py", "tests/test_data.py")
CONFIG_TESTS = ("tests/test_config.py", "tests/test_hardening_config.py")
CONVERT_TESTS = ("tests/test_model.py", "tests/test_hardening_checkpoints.py", "tests/test_cut.py")
MODEL_TESTS = ("tests/test_generate.py", "tests/test_model.py")
EFFICIENCY_TESTS = ("benchmarks/test_efficiency.py",)
LLAMA_TESTS = ("tests/test_llama.py",)
KERNEL_LLAMA_TESTS = ("tests/test_kernels_llama.py",)
CAPACITY_TESTS = ("tests/test_capacity.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    path: str  # file, relative to the repository root
    old: str   # literal text that must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]


# The benchmarks' counting code: the efficiency report's rows, ratios and CSV files (its FLOP and memory counts
# come from mom/flops.py and mom/memory.py, covered as modules of mom/).
COUNTING_CODE = ("benchmarks/efficiency.py", "benchmarks/common.py")

GEMM = "mom_kernels/gemm.py"            # the grouped GEMM and its epilogue
COMMON = "mom_kernels/common.py"        # GELU and its derivative
GA = "mom_kernels/gathers.py"           # sorted rows, the forward's LayerNorm, LayerNorm statistics
WG = "mom_kernels/weight_grads.py"      # dW, db
RED = "mom_kernels/reductions.py"       # combine, LayerNorm affine gradients

MUTATIONS: List[Mutation] = [
    # ---- routers (mom/routers.py) ----
    Mutation("router_weights_swapped", "the K weights reversed after renormalisation", "mom/routers.py",
             "weights = weights / weights.sum(dim=-1, keepdim=True)",
             "weights = (weights / weights.sum(dim=-1, keepdim=True)).flip(-1)", tuple(ROUTING_TESTS)),
    Mutation("router_renormalisation_dropped", "top-K weights not renormalised", "mom/routers.py",
             "weights = weights / weights.sum(dim=-1, keepdim=True)", "weights = weights", tuple(ROUTING_TESTS)),
    Mutation("router_temperature_ignored", "softmax of the raw logits", "mom/routers.py",
             "torch.softmax(logits / config.router_temperature, dim=-1)", "torch.softmax(logits, dim=-1)",
             tuple(ROUTING_TESTS)),
    Mutation("router_skip_not_clamped", "SKIP slot ids >= n_modules not clamped to the SKIP id",
             "mom/routers.py", "ids = slots.clamp(max=n_modules)", "ids = slots", tuple(ROUTING_TESTS)),
    Mutation("router_straight_through_no_gradient", "straight-through weights: value 1 but no gradient",
             "mom/routers.py", "weights = weights - weights.detach() + 1.0",
             "weights = weights.detach() * 0.0 + 1.0", tuple(ROUTING_TESTS)),
    Mutation("balance_loss_missing_n", "balance loss without its factor n", "mom/routers.py",
             "return f.numel() * (f * P).sum()", "return (f * P).sum()", tuple(ROUTING_TESTS)),
    # ---- the step loop (mom/layer.py) ----
    Mutation("layer_ffn_gru_state_not_carried", "the FFN router's GRU state restarts at every step",
             "mom/layer.py", "self.ffn_router(xf, state_f", "self.ffn_router(xf, None", tuple(STEP_TESTS)),
    Mutation("layer_attn_gru_state_not_carried", "the attention router's GRU state restarts at every step",
             "mom/layer.py", "self.attn_router(xf, state_a", "self.attn_router(xf, None", tuple(STEP_TESTS)),
    Mutation("layer_weighted_qkv_ignored", "config.weighted_qkv has no effect", "mom/layer.py",
             "ra.weights if cfg.weighted_qkv else None", "None", tuple(STEP_TESTS)),
    Mutation("layer_attn_residual_dropped", "x = attention output instead of x + attention output",
             "mom/layer.py", "residual=xf)                      # xf + the routed projection",
             "residual=None)                      # xf + the routed projection", tuple(STEP_TESTS)),
    Mutation("layer_ffn_residual_dropped", "x = FFN output instead of x + FFN output", "mom/layer.py",
             "plan=plan, residual=xf, norm=cfg.norm,", "plan=plan, residual=None, norm=cfg.norm,", tuple(STEP_TESTS)),
    Mutation("layer_aux_loss_summed", "aux loss summed over routers and steps instead of averaged", "mom/layer.py",
             "        return torch.stack(losses).mean()\n", "        return torch.stack(losses).sum()\n",
             tuple(STEP_TESTS)),
    Mutation("layer_pooled_balance_last_step", "pooled balance loss uses the last step's f only", "mom/layer.py",
             "f = torch.stack([t[i].f for t in terms]).mean(0)", "f = terms[-1][i].f",
             tuple(ROUTING_TESTS[:1] + STEP_TESTS)),
    Mutation("layer_kv_cache_wrong_step", "every step attends over the first step's KV cache", "mom/layer.py",
             "past = past_key_values[h] if", "past = past_key_values[0] if",
             ("tests/test_generate.py", "tests/test_oracle_step.py")),
    # ---- plans: mom_kernels/routing.py (the torch plan, the reference) and route.py (the Triton plan) ----
    Mutation("plan_torch_tile_row_start_off_by_one_tile", "every tile starts one tile late (torch plan)",
             "mom_kernels/routing.py", "tile_row_start = offsets[m] + (i - (tile_end - tiles)[m]) * block_m",
             "tile_row_start = offsets[m] + (i + 1 - (tile_end - tiles)[m]) * block_m", tuple(PLAN_TESTS)),
    Mutation("plan_torch_offsets_shifted", "module offsets one row late (torch plan)", "mom_kernels/routing.py",
             "offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)",
             "offsets = torch.searchsorted(sorted_key, bounds, out_int32=True) + 1", tuple(PLAN_TESTS)),
    Mutation("plan_triton_tile_row_start_off_by_one_tile", "every tile starts one tile late (Triton plan)",
             "mom_kernels/route.py", "row0 + (i - t0) * BLOCK_M", "row0 + (i - t0 + 1) * BLOCK_M",
             tuple(PLAN_TESTS + KERNEL_TESTS[:1])),
    Mutation("plan_triton_later_tiles_overlap", "a module's 2nd, 3rd.. tiles start one row early: its last "
             "rows are never computed (Triton plan)", "mom_kernels/route.py", "row0 + (i - t0) * BLOCK_M",
             "row0 + (i - t0) * (BLOCK_M - 1)", tuple(PLAN_TESTS + KERNEL_TESTS[:1])),
    Mutation("plan_triton_offsets_shifted", "module offsets one row late (Triton plan)", "mom_kernels/route.py",
             "tl.store(offsets_ptr + offs_e, starts, mask=mask_e)",
             "tl.store(offsets_ptr + offs_e, starts + 1, mask=mask_e)", tuple(PLAN_TESTS + KERNEL_TESTS[:1])),
    # ---- kernel epilogues and reductions (mom_kernels/gemm.py, common.py, reductions.py, weight_grads.py) ----
    Mutation("gemm_bias_dropped", "grouped GEMM epilogue: bias not added", GEMM,
             "acc += bias.to(cdt)", "acc += 0.0 * bias.to(cdt)", tuple(KERNEL_TESTS)),
    Mutation("gelu_constant_wrong", "GELU's cubic coefficient 0.045 instead of 0.044715", COMMON,
             "return _tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))",
             "return _tanh(0.7978845608028654 * (u + 0.045 * u * u * u))", tuple(KERNEL_TESTS)),
    Mutation("gelu_grad_constant_wrong", "GELU derivative's coefficient 0.134 instead of 0.134145", COMMON,
             "(1.0 + 0.134145 * u * u)", "(1.0 + 0.134 * u * u)", tuple(KERNEL_TESTS)),
    Mutation("gemm_weights_not_applied", "grouped GEMM epilogue: routing weight g not applied", GEMM,
             "acc = acc * g[:, None]", "acc = acc", tuple(KERNEL_TESTS)),
    Mutation("gemm_pre_not_saved", "FFN up GEMM stores zeros as the saved pre-activation", GEMM,
             "_cast(acc, pre_ptr.dtype.element_ty, RTNE), mask=mask_mn)",
             "_cast(acc * 0.0, pre_ptr.dtype.element_ty, RTNE), mask=mask_mn)", tuple(KERNEL_TESTS)),
    Mutation("gemm_tile_row_start_ignored", "grouped GEMM reads row 0 as every tile's first row", GEMM,
             "row_start = tl.load(tile_row_start_ptr + tile)",
             "row_start = tl.load(tile_row_start_ptr + tile) * 0", tuple(KERNEL_TESTS)),
    Mutation("combine_skips_last_pick", "combine sums only the first K-1 picks of a token", RED,
             "for k in range(0, TOP_K):", "for k in range(0, TOP_K - 1):", tuple(KERNEL_TESTS)),
    Mutation("combine_includes_skip", "combine also sums the slots of SKIP picks", RED,
             "valid = mask_t & (mod >= 0) & (mod < N_MOD)", "valid = mask_t & (mod >= 0) & (mod <= N_MOD)",
             tuple(KERNEL_TESTS)),
    Mutation("gather_rows_weights_ignored", "the _grouped_mm dW path's gathered dY rows miss the routing weights",
             GA, "v = _cast(v, out_ptr.dtype.element_ty, RTNE).to(cdt) * g[:, None]",
             "v = _cast(v, out_ptr.dtype.element_ty, RTNE).to(cdt)",
             ("tests/test_kernels_weight_grad.py",) + tuple(KERNEL_TESTS[:3])),
    Mutation("ffn_dg_rowdot_without_gelu", "FFN routing-weight gradient dots G with pre instead of gelu(pre)",
             GEMM, "uu = _gelu_of(pre, th)", "uu = pre", tuple(KERNEL_TESTS)),
    Mutation("ln_stats_eps_outside_sqrt", "LayerNorm statistics kernel (fused path, backward): 1/sqrt(var) + eps "
             "instead of 1/sqrt(var + eps)", GA, "rstd = 1.0 / tl.sqrt(acc / D + eps)",
             "rstd = 1.0 / tl.sqrt(acc / D) + eps", tuple(KERNEL_TESTS)),
    Mutation("combine_residual_dropped", "the residual= stream is not added in the combine", RED,
             "acc += tl.load(res_ptr", "acc += 0.0 * tl.load(res_ptr",
             ("tests/test_kernels_residual.py",) + tuple(KERNEL_TESTS) + ("tests/test_oracle_step.py",)),
    # ---- the forward's sorted LayerNorm buffer (mom_kernels/gathers.py, the default path) ----
    Mutation("ln_gather_mean_ignored", "sorted LayerNorm rows ignore the mean", GA,
             "u = (v - mean[:, None]) * rstd[:, None] * ga", "u = v * rstd[:, None] * ga",
             tuple(GATHER_TESTS)),
    Mutation("ln_gather_no_shift", "variance from E[x^2] - E[x]^2 without the shift (cancels for a large mean)",
             GA, "shift = tl.load(x_ptr + rows, mask=mask_r, other=0.0).to(cdt)",
             "shift = tl.load(x_ptr + rows, mask=mask_r, other=0.0).to(cdt) * 0.0", tuple(GATHER_TESTS)),
    Mutation("row_module_off_by_one_row", "each module's first sorted row is given to the previous module "
             "(gamma/beta of the LayerNorm gathers, bias of the split epilogue)",
             COMMON, "mod += (offs_s >= tl.load(offsets_ptr + e)).to(tl.int32)",
             "mod += (offs_s > tl.load(offsets_ptr + e)).to(tl.int32)",
             tuple(GATHER_TESTS)),
    Mutation("ln_gather_eps_outside_sqrt", "1/sqrt(var) + eps instead of 1/sqrt(var + eps)", GA,
             "rstd = 1.0 / tl.sqrt(tl.maximum(s2 / N - m1 * m1, 0.0) + eps)",
             "rstd = 1.0 / tl.sqrt(tl.maximum(s2 / N - m1 * m1, 0.0)) + eps", tuple(GATHER_TESTS)),
    Mutation("dw_gather_ln_mean_ignored", "the _grouped_mm dW path's gathered LayerNorm rows ignore the mean", GA,
             "v = (v - mu[:, None]) * rs[:, None] * ga.to(cdt)",
             "v = v * rs[:, None] * ga.to(cdt)", tuple(KERNEL_TESTS)),
    Mutation("ln_mean_ignored_fused_prologue", "the fused LayerNorm prologue (MOM_KERNELS_LN=fused) ignores the "
             "mean", GEMM,
             "u = (a.to(cdt) - mu[:, None]) * rs[:, None] * ga.to(cdt)[None, :]",
             "u = a.to(cdt) * rs[:, None] * ga.to(cdt)[None, :]", tuple(LN_FUSED_TESTS)),
    Mutation("dw_row_mask_off_by_one", "dW kernel's row mask drops each module's last row", WG,
             "offs_s = start + i * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]\n        mask_r = offs_s < end",
             "offs_s = start + i * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]\n        mask_r = offs_s < end - 1",
             tuple(KERNEL_TESTS)),
    Mutation("segment_sum_weights_ignored", "db of the weighted layers summed without the routing weights", WG,
             "dy = _cast(dy.to(cdt) * g[:, None], dy_ptr.dtype.element_ty, RTNE)\n        acc += dy.to(cdt)",
             "dy = dy\n        acc += dy.to(cdt)", tuple(KERNEL_TESTS)),
    Mutation("ln_affine_dbeta_zero", "d beta of the per-module LayerNorms is zero", RED,
             "accb += tl.sum(du, axis=0)", "accb += 0.0 * tl.sum(du, axis=0)", tuple(KERNEL_TESTS)),
    Mutation("segment_tiles_one_per_sm", "the segmented reductions keep 160 programs on 132 SMs",
             "mom_kernels/common.py",
             "while block_n > 32 and E * triton.cdiv(N, block_n) < 4 * n_sms:",
             "while block_n > 32 and E * triton.cdiv(N, block_n) < n_sms:", ("tests/test_kernels_segments.py",)),
    Mutation("tma_transposed_module_row", "dX's TMA tiles start at the module's N_IN rows, not N_OUT",
             "mom_kernels/gemm.py", "w = w_desc.load([m * N_OUT + pid_n * BLOCK_N, k0]).T",
             "w = w_desc.load([m * N_IN + pid_n * BLOCK_N, k0]).T", ("tests/test_kernels_tma.py",)),
    Mutation("tma_k_offset_dropped", "the TMA tiles of W ignore the reduction offset", "mom_kernels/gemm.py",
             "w = w_desc.load([m * N_IN + k0, pid_n * BLOCK_N])", "w = w_desc.load([m * N_IN, pid_n * BLOCK_N])",
             ("tests/test_kernels_tma.py",)),
    Mutation("subtile_slice_columns_dropped", "every epilogue slice writes the tile's first columns", GEMM,
             "offs_j += BN_S", "offs_j += 0", ("tests/test_kernels_subtile.py",)),
    Mutation("subtile_quarters_out_of_order", "the 4-slice epilogue stores the middle quarters swapped", GEMM,
             "slices = (ll, lr, rl, rr)", "slices = (ll, rl, lr, rr)", ("tests/test_kernels_subtile.py",)),
    Mutation("subtile_rowdot_last_slice_only", "the routing weight's row dot keeps only the last slice's part", GEMM,
             "part += _epilogue(slices[j]", "part = _epilogue(slices[j]", ("tests/test_kernels_subtile.py",)),
    Mutation("tma_a_k_offset_dropped", "the TMA tiles of sorted A rows ignore the reduction offset", GEMM,
             "a = a_desc.load([row_start, k0])", "a = a_desc.load([row_start, 0])", ("tests/test_kernels_tma.py",)),
    Mutation("tma_a_row_offset_by_module", "the TMA tiles of sorted A rows start at the module's first row", GEMM,
             "a = a_desc.load([row_start, k0])", "a = a_desc.load([tl.load(offsets_ptr + m), k0])",
             ("tests/test_kernels_tma.py",)),
    Mutation("autotune_keeps_slowest", "the autotuner keeps the slowest candidate", "mom_kernels/autotune.py",
             "best = min(candidates, key=lambda c: times[c])", "best = max(candidates, key=lambda c: times[c])",
             ("tests/test_kernels_autotune.py",)),
    Mutation("autotune_forgets", "the autotuner times every call again", "mom_kernels/autotune.py",
             "    if key in _chosen:\n        return _chosen[key]\n", "", ("tests/test_kernels_autotune.py",)),
    Mutation("decode_splitk_last_split_dropped", "the split-K second pass leaves out the last split",
             "mom_kernels/decode.py", "for ks in range(1, SPLIT):", "for ks in range(1, SPLIT - 1):",
             ("tests/test_decode_kernels.py",)),
    Mutation("decode_splitk_splits_overlap", "each split runs to the end of the reduction", "mom_kernels/decode.py",
             "k_hi = tl.minimum(k_lo + K_PER, N_in)", "k_hi = N_in + 0 * K_PER", ("tests/test_decode_kernels.py",)),
    Mutation("few_tokens_route_ties_to_higher_slot", "the host top-K breaks ties to the higher slot",
             "mom/few_tokens.py", "slots.append(sorted(range(len(row)), key=row.__getitem__, reverse=True)[:K])",
             "slots.append(sorted(range(len(row)), key=lambda i: (row[i], i), reverse=True)[:K])",
             ("tests/test_few_tokens.py",)),
    Mutation("few_tokens_views_stale", "the per-module weight views outlive a new storage", "mom/few_tokens.py",
             "if hit is not None and hit[1] == where and hit[0]() is t:", "if hit is not None:",
             ("tests/test_few_tokens.py",)),
    Mutation("autotune_cache_any_device", "the autotune cache file's choices are used on any device",
             "mom_kernels/autotune.py", ".get(_device_name(like), {}).items()}",
             ".get(next(iter(_read_cache(path)), None), {}).items()}", ("tests/test_kernels_autotune.py",)),
    # ---- the torch backend (mom/routed.py) ----
    Mutation("torch_combine_weights_dropped", "torch backend's combine sums the K rows unweighted",
             "mom/routed.py", "return torch.bmm(weights.unsqueeze(1).to(per_pick.dtype), per_pick).squeeze(1)",
             "return per_pick.sum(dim=1)", tuple(TORCH_TESTS)),
    # ---- the torch backend's few-token path (mom/few_tokens.py) ----
    Mutation("few_tokens_pick_row_of_k0", "every pick of a token reads the row of its first pick", "mom/few_tokens.py",
             "row_of_pick[t * K + k] = i", "row_of_pick[t * K] = i", ("tests/test_few_tokens.py",)),
    Mutation("few_tokens_skip_counted", "SKIP picks run module E - 1", "mom/few_tokens.py",
             "for k, m in enumerate(row) if m < n_modules)",
             "for k, m in enumerate(min(v, n_modules - 1) for v in row))",
             ("tests/test_few_tokens.py",)),
    Mutation("few_tokens_ln_module_of_token", "each row's gamma, beta taken by token, not module", "mom/few_tokens.py",
             "u = torch.addcmul(beta.index_select(0, plan.module), u, gamma.index_select(0, plan.module))",
             "u = torch.addcmul(beta.index_select(0, plan.token), u, gamma.index_select(0, plan.token))",
             ("tests/test_few_tokens.py",)),
    Mutation("few_tokens_one_token_row_0", "one token: every pick writes row 0", "mom/few_tokens.py",
             "self.groups = [(m, k, k + 1) for k, m in", "self.groups = [(m, 0, 1) for k, m in",
             ("tests/test_few_tokens.py",)),
    Mutation("few_tokens_residual_dropped", "the fused residual is not added", "mom/few_tokens.py",
             "return torch.baddbmm(residual.unsqueeze(1), g, slots).squeeze(1)",
             "return torch.bmm(g, slots).squeeze(1)",
             ("tests/test_few_tokens.py",)),
    Mutation("gpu_check_option_typo", "a benchmark option misspelt in the GPU script", "benchmarks/gpu_check.sh",
             "--seq-len 1024", "--seqlen 1024", ("benchmarks/test_gpu_check.py",)),
    Mutation("gpu_check_missing_test_file", "the GPU script names a test file that does not exist",
             "benchmarks/gpu_check.sh", "tests/test_kernels_gru.py", "tests/test_kernels_grus.py",
             ("benchmarks/test_gpu_check.py",)),
    Mutation("additive_mask_not_kept", "the mask converted again at every attention call", "mom/blocks.py",
             "        mask._mom_additive = (mask._version, dtype, add)\n", "        mask = mask\n",
             ("tests/test_attention_mask.py",)),
    Mutation("additive_mask_inverted", "the additive mask blocks the keys the bool mask allows", "mom/blocks.py",
             ".masked_fill_(mask.logical_not(), float(\"-inf\"))", ".masked_fill_(mask, float(\"-inf\"))",
             ("tests/test_attention_mask.py",)),
    Mutation("additive_mask_version_ignored", "an in-place change of the mask keeps the old conversion",
             "mom/blocks.py", "hit[0] == mask._version and ", "", ("tests/test_attention_mask.py",)),
    Mutation("decode_ln_mean_not_subtracted", "the decode GEMV's in-kernel LayerNorm forgets the mean",
             "mom_kernels/decode.py", "a = (a.to(acc.dtype) - mean[:, None]) * rstd[:, None]",
             "a = a.to(acc.dtype) * rstd[:, None]", ("tests/test_decode_kernels.py",)),
    Mutation("decode_ln_stats_over_split", "the in-kernel LayerNorm statistics cover only the program's split",
             "mom_kernels/decode.py", "mean, rstd = _row_stats(a_ptr, rows, sel, N_in,",
             "mean, rstd = _row_stats(a_ptr, rows, sel, k_hi,", ("tests/test_decode_kernels.py",)),
    Mutation("decode_splitk_combine_first_pick_only", "the fused second pass sums only each token's first pick",
             "mom_kernels/decode.py", "    for k in range(0, K_PICKS):\n        offs_p = offs_t * K_PICKS + k",
             "    for k in range(0, 1):\n        offs_p = offs_t * K_PICKS + k", ("tests/test_decode_kernels.py",)),
    Mutation("decode_splitk_combine_no_residual", "the fused second pass drops the residual", "mom_kernels/decode.py",
             "HAS_G=g_flat is not None, HAS_RES=residual is not None, RTNE=interp,",
             "HAS_G=g_flat is not None, HAS_RES=False, RTNE=interp,", ("tests/test_decode_kernels.py",)),
    Mutation("decode_splitk_combine_unweighted", "the fused second pass ignores the routing weights",
             "mom_kernels/decode.py", "HAS_BIAS=bias is not None, HAS_G=g_flat is not None, HAS_RES",
             "HAS_BIAS=bias is not None, HAS_G=False, HAS_RES", ("tests/test_decode_kernels.py",)),
    Mutation("decode_extra_copies", "the decode routed linear copies its ids and weights (two launches more)",
             "mom_kernels/decode.py",
             "ids_flat = ids.reshape(-1).contiguous()\n    g = weights.reshape(-1).contiguous()",
             "ids_flat = ids.reshape(-1).clone()\n    g = weights.reshape(-1).clone()",
             ("tests/test_launches.py",)),
    Mutation("chunk_output_not_pytree", "MoMLayerOutput no longer a pytree node (FSDP2 on torch 2.11 misses its "
             "tensors)", "mom/layer.py", "pytree.register_dataclass(MoMLayerOutput)\n", "",
             ("tests/test_model.py",)),
    Mutation("aot_arch_prefix_kept", "--archs sm_90 no longer parsed", "mom_kernels/aot.py",
             '.removeprefix("sm_")', "", ("tests/test_aot.py",)),
    # ---- the training loop (mom/train.py) ----
    Mutation("train_step_before_clip", "the optimizer steps before the gradients are clipped", "mom/train.py",
             "    if grad_clip > 0:\n"
             "        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))\n"
             "    else:\n        gnorm = float(\"nan\")\n    optimizer.step()\n",
             "    optimizer.step()\n    if grad_clip > 0:\n"
             "        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))\n"
             "    else:\n        gnorm = float(\"nan\")\n", TRAIN_TESTS),
    Mutation("train_accumulation_sums", "gradient accumulation sums the micro-batches' losses instead of averaging",
             "mom/train.py", "(out.loss / accum).backward()", "out.loss.backward()", TRAIN_TESTS),
    Mutation("train_warmup_off_by_one", "the warmup's first step has learning rate 0", "mom/train.py",
             "return tc.lr * (step + 1) / tc.warmup_steps", "return tc.lr * step / tc.warmup_steps", TRAIN_TESTS),
    Mutation("train_embeddings_decayed", "weight decay applied to the token embeddings", "mom/train.py",
             'parts[0] in ("wte", "wpe")', 'parts[0] in ("wpe",)', TRAIN_TESTS),
    Mutation("train_validation_mean_of_batch_means", "validation loss averages the batches' means (a short last "
             "batch weighs as much as a full one)", "mom/train.py",
             "            total[0] += float(out.lm_loss) * len(idx)\n            total[1] += len(idx)",
             "            total[0] += float(out.lm_loss)\n            total[1] += 1", TRAIN_TESTS),
    Mutation("train_global_batch_remainder_accepted", "a global batch that is not a multiple of batch_size x "
             "ranks is accepted (its remainder silently dropped)", "mom/train.py",
             "    if gbs % (tc.batch_size * d.world):\n", "    if False:\n", TRAIN_TESTS),
    Mutation("train_distributed_nn_imported_late", "torch.distributed.nn imported after the process group exists "
             "(its default arguments then hold the group past destroy_process_group)", "mom/train.py",
             "        from torch.distributed import nn as _dist_nn  # noqa: F401\n", "",
             ("tests/test_train.py::test_torchrun_two_processes_match_one[ddp]",)),
    Mutation("train_worker_runs_interpreter_shutdown", "a torchrun worker ends through the interpreter's shutdown "
             "(beside the threads of a process group torch kept alive)", "mom/train.py",
             "    if worker:\n        _exit_command(0, worker)\n", "",
             ("tests/test_train.py::test_torchrun_two_processes_match_one[fsdp]",)),
    # ---- data order and windows (mom/data.py) ----
    Mutation("data_epochs_repeat_the_first_shuffle", "every epoch reuses the first epoch's permutation",
             "mom/data.py", "if self._perm is None or self._perm[0] != epoch:", "if self._perm is None:",
             DATA_TESTS),
    Mutation("data_epoch_seed_ignores_epoch", "the permutation is seeded without the epoch", "mom/data.py",
             "np.random.default_rng([seed, epoch])", "np.random.default_rng([seed, 0])", DATA_TESTS),
    Mutation("data_window_off_by_one", "window i starts one token late", "mom/data.py",
             "self.tokens[i * self.block_size:(i + 1) * self.block_size]",
             "self.tokens[i * self.block_size + 1:(i + 1) * self.block_size + 1]", DATA_TESTS),
    Mutation("data_rank_and_micro_order_swapped", "the global sample index nests ranks inside micro-batches",
             "mom/data.py", "first = ((step * accum + micro) * world + rank) * batch_size",
             "first = ((step * world + rank) * accum + micro) * batch_size", DATA_TESTS),
    # ---- crash-safe files (mom/io.py) ----
    Mutation("io_atomic_dir_unlisted_file_replaced_by_old", "atomic_dir carries the old copy of a file the block "
             "wrote but did not list in `owned` over the new one", "mom/io.py",
             "mine = set(owned) | set(os.listdir(tmp))", "mine = set(owned)", IO_TESTS),
    Mutation("io_recover_deletes_complete_new", "recovery after a kill between the renames deletes the complete "
             "new folder", "mom/io.py",
             "            os.replace(new, final)\n            _fsync_path(parent, directory=True)\n"
             "            done.append(f\"swapped in {new}\")",
             "            _remove(new)\n            done.append(f\"swapped in {new}\")", IO_TESTS),
    Mutation("io_torn_line_dropped_anywhere", "read_jsonl drops a bad line anywhere, not only the last one",
             "mom/io.py", "last = all(not rest.strip() for rest in lines[i + 1:])", "last = True", IO_TESTS),
    Mutation("io_live_writers_temp_deleted", "a running process's temp file counts as stale", "mom/io.py",
             'if path in _ACTIVE or (int(m.group("pid")) != os.getpid() and _pid_alive(int(m.group("pid")))):',
             "if path in _ACTIVE:", IO_TESTS),
    # ---- generation (mom/generate.py) and KV caches (mom/cache.py) ----
    Mutation("generate_trimmed_one_short", "the output is cut one token short when every row stopped",
             "mom/generate.py", "n = int(first.max()) + 1", "n = int(first.max())", (STOPS,) + GENERATE_TESTS),
    Mutation("generate_top_p_drops_the_crossing_token", "nucleus sampling drops the token that crosses top_p",
             "mom/generate.py", "drop = (probs.cumsum(dim=-1) - probs) >= top_p", "drop = probs.cumsum(dim=-1) > top_p",
             ("tests/test_decode_static.py::test_top_p_keeps_the_token_that_crosses_the_threshold",) + GENERATE_TESTS),
    Mutation("generate_finished_rows_not_padded", "rows that emitted a stop token keep generating",
             "mom/generate.py", "nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)", "nxt = nxt",
             (STOPS,) + GENERATE_TESTS),
    Mutation("generate_cli_counts_unchecked", "python -m mom.generate accepts --max-new-tokens 0",
             "mom/generate.py", "if a.max_new_tokens < 1 or a.num_samples < 1:", "if False:",
             ("tests/test_generate_cli.py",)),
    Mutation("cache_static_padding_query_attends_nothing", "static cache: a padding query no longer sees itself "
             "(its softmax has no term)", "mom/cache.py",
             "mask = causal[None] & (self.key_mask[:, None, :] | own[None])",
             "mask = causal[None] & self.key_mask[:, None, :]", (MASKS,) + GENERATE_TESTS),
    Mutation("cache_dynamic_padding_query_attends_nothing", "padded forward: a padding query no longer sees itself",
             "mom/cache.py", "return pos, (causal[None] & (m[:, None, :] | own[None]))[:, None]",
             "return pos, (causal[None] & m[:, None, :])[:, None]", (MASKS,) + GENERATE_TESTS),
    Mutation("cache_decode_positions_by_cache_length", "static cache: decode positions count the padding of "
             "left-padded rows", "mom/cache.py",
             "pos = (self.n_valid[:, None] + new_mask.long().cumsum(1) - 1).clamp_(min=0)",
             "pos = (self.length + new_mask.long().cumsum(1) - 1).clamp_(min=0)", (MASKS,) + GENERATE_TESTS),
    Mutation("cache_unequal_lengths_accepted", "a cache whose entries hold different lengths passes the check",
             "mom/cache.py", "            if p != P:\n", "            if False:\n",
             ("tests/test_hardening_cache.py",)),
    # ---- Hugging Face wrapper (mom/hf.py) ----
    Mutation("hf_logits_to_keep_ignored", "the HF wrapper computes every position's logits whatever logits_to_keep",
             "mom/hf.py", "attention_mask, P, logits_to_keep)", "attention_mask, P, 0)", ("tests/test_hf.py",)),
    Mutation("hf_cached_length_ignored", "the HF wrapper positions new tokens as if nothing were cached",
             "mom/hf.py", "P = cache.get_seq_length() if cache is not None else 0", "P = 0", ("tests/test_hf.py",)),
    # ---- the cost model (mom/flops.py) and measured memory (mom/memory.py) ----
    Mutation("flops_expected_ignores_cache", "flops.expected's routed attention core ignores the cached length",
             "mom/flops.py", "    N, S = B * T, P + T\n", "    N, S = B * T, T\n", FLOPS_TESTS),
    Mutation("flops_count_counts_skip", "flops.count charts SKIP attention picks as modules", "mom/flops.py",
             "a_live = step.attn_ids < cfg.n_attn", "a_live = step.attn_ids <= cfg.n_attn", FLOPS_TESTS),
    Mutation("flops_causal_core_off_by_one", "the causal attention core counts i keys for query i, not i + 1",
             "mom/flops.py", "return 4 * B * D * (T * P + T * (T + 1) // 2)",
             "return 4 * B * D * (T * P + T * (T - 1) // 2)", FLOPS_TESTS),
    Mutation("memory_no_skip_lets_first_skip_slot_through", "a no-skip measurement leaves the first SKIP slot open",
             "mom/memory.py", "router.head.bias[pool:] = -1e4", "router.head.bias[pool + 1:] = -1e4",
             ("tests/test_memory.py",)),
    Mutation("memory_decode_baseline_without_cache", "the decode baseline leaves out the cache passed in",
             "mom/memory.py", "base = w + tensor_bytes(input_ids) + cache_bytes(past_key_values)",
             "base = w + tensor_bytes(input_ids)", ("tests/test_memory.py",)),
    Mutation("memory_decode_weights_count_skip", "decode weight bytes count SKIP picks as modules", "mom/memory.py",
             "total += per_module * int((picked < pool.n_modules).sum())", "total += per_module * picked.numel()",
             ("tests/test_memory.py",)),
    # ---- routing analysis and removal (mom/analysis.py), the function-preserving cut (mom/cut.py) ----
    Mutation("analysis_removal_floors", "removal floors the share of modules instead of rounding it",
             "mom/analysis.py", "return int(math.floor(frac * pool + 0.5))", "return int(frac * pool)",
             ("tests/test_analysis.py",)),
    Mutation("analysis_removal_halves_to_even", "removal rounds a half to the even count (Python's round)",
             "mom/analysis.py", "return int(math.floor(frac * pool + 0.5))", "return round(frac * pool)",
             ("tests/test_analysis.py",)),
    Mutation("analysis_ties_lower_id_first", "equally used modules: the lower id is removed first",
             "mom/analysis.py", "key=lambda e: (use[e], -e)", "key=lambda e: (use[e], e)", ("tests/test_analysis.py",)),
    Mutation("analysis_curves_offset_not_chained", "loss curves: a run's token axis starts after its init_from run "
             "only, not after that run's own predecessors", "mom/analysis.py",
             'return max(r["tokens"] for r in _metrics(src)) + _offset(src)',
             'return max(r["tokens"] for r in _metrics(src))', ("tests/test_analysis.py",)),
    Mutation("analysis_cli_windows_unchecked", "python -m mom.analysis accepts --windows 0", "mom/analysis.py",
             '("windows", a.windows is None or a.windows >= 1, ">= 1")', '("windows", True, ">= 1")',
             ("tests/test_analysis.py",)),
    Mutation("analysis_skip_rows_dropped", "removal drops the routers' SKIP logits rows", "mom/analysis.py",
             "torch.tensor(kept + list(range(E, slots)))", "torch.tensor(kept)", ("tests/test_analysis.py",)),
    Mutation("cut_exactness_bound_moved", "the fp64 exactness bound of the routing prior moved from 38 to 30 nats",
             "mom/cut.py", "return 0 < cfg.routing_prior < 38", "return 0 < cfg.routing_prior < 30",
             ("tests/test_cut.py",)),
    Mutation("cut_second_pick_without_skip_accepted", "top_k = 2 without a SKIP slot counted as preserving",
             "mom/cut.py", "if cfg.top_k > 1 + int(cfg.skip):", "if cfg.top_k > 2:", ("tests/test_cut.py",)),
    Mutation("cut_extra_steps_with_k2_accepted", "extra steps (depth > M) accepted with top_k = 2", "mom/cut.py",
             "if cfg.depth > M and not (cfg.top_k == 1 and cfg.skip):", "if cfg.depth > M and not cfg.skip:",
             ("tests/test_cut.py",)),
    # ---- tokenizers (mom/tokenizer.py) ----
    Mutation("tokenizer_byte_table_soft_hyphen", "the byte table keeps the unprintable soft hyphen as itself",
             "mom/tokenizer.py", 'list(range(ord("¡"), ord("¬") + 1))', 'list(range(ord("¡"), ord("®") + 1))',
             TOKENIZER_TESTS),
    Mutation("tokenizer_one_id_too_many", "train_bpe learns one merge too many (vocab_size + 1 ids)",
             "mom/tokenizer.py", "trainers.BpeTrainer(vocab_size=vocab_size - 1,",
             "trainers.BpeTrainer(vocab_size=vocab_size,", TOKENIZER_TESTS),
    Mutation("tokenizer_file_size_unchecked", "load_local accepts a file whose vocab_size its merges do not rebuild",
             "mom/tokenizer.py", 'if tok.vocab_size != d["vocab_size"]:', "if False:", TOKENIZER_TESTS),
    # ---- configuration (mom/config.py) ----
    Mutation("config_head_must_divide_width_dropped", "n_embd not divisible by n_head accepted", "mom/config.py",
             'need(self.n_embd % self.n_head == 0, "n_head"', 'need(True, "n_head"', CONFIG_TESTS),
    Mutation("config_top_k_beyond_slots_accepted", "top_k larger than the router's slots accepted", "mom/config.py",
             'need(self.top_k <= slots, "top_k",', 'need(True, "top_k",', CONFIG_TESTS),
    Mutation("config_source_layers_by_attention_pool", "source_layers counts n_attn layers per chunk, not "
             "max(n_attn, n_ffn)", "mom/config.py",
             "return self.n_bottom + self.chunks * (self.n_modules + int(self.anchor)) + self.n_top",
             "return self.n_bottom + self.chunks * (self.n_attn + int(self.anchor)) + self.n_top", CONFIG_TESTS),
    # ---- checkpoints in and out (mom/convert.py) ----
    Mutation("convert_attention_modules_from_the_last_layers", "attention modules cut from the chunk's last n_attn "
             "layers (n_attn < n_ffn: the first layers' attention dropped instead of the last)",
             "mom/convert.py", "attn, ffn = cut[: config.n_attn], cut[: config.n_ffn]",
             "attn, ffn = cut[-config.n_attn:], cut[: config.n_ffn]",
             ("tests/test_model.py::test_from_gpt2_layer_map_with_unequal_pools",) + CONVERT_TESTS),
    Mutation("convert_dtype_from_first_tensor", "from_pretrained takes the dtype of the file's first tensor (an "
             "integer buffer sorts first)", "mom/convert.py",
             "dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), None)",
             "dtype = next((v.dtype for v in sd.values()), None)", CONVERT_TESTS),
    Mutation("convert_save_owns_the_whole_folder", "save_pretrained deletes the other files of its folder",
             "mom/convert.py", "with atomic_dir(directory, owned=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:",
             "with atomic_dir(directory) as tmp:", CONVERT_TESTS),
    # ---- the model (mom/model.py), the compile-time ops (mom/opaque.py), CUDA graphs (mom/cuda_graphs.py) ----
    Mutation("model_logits_to_keep_first_positions", "logits_to_keep keeps the first positions, not the last",
             "mom/model.py", "x = x[:, -logits_to_keep:]", "x = x[:, :logits_to_keep]", MODEL_TESTS),
    Mutation("model_positions_ignore_cache", "cached decoding restarts the position ids at 0", "mom/model.py",
             "pos = torch.arange(P, P + T, device=input_ids.device)", "pos = torch.arange(T, device=input_ids.device)",
             MODEL_TESTS),
    Mutation("model_labels_not_shifted", "the LM loss compares each position's logits with its own token",
             "mom/model.py", "labels[:, 1:].reshape(-1), ignore_index=-100)",
             "labels[:, :-1].reshape(-1), ignore_index=-100)",
             ("tests/test_model.py::test_lm_loss_is_the_next_token_cross_entropy",) + MODEL_TESTS),
    Mutation("opaque_ln_grads_swapped", "compiled routed_linear: LayerNorm gain and bias gradients swapped",
             "mom/opaque.py", "none(ln_weight, g[4]), none(ln_bias, g[5])",
             "none(ln_weight, g[5]), none(ln_bias, g[4])", ("tests/test_compile.py",)),
    Mutation("opaque_ffn_routing_weight_grad_dropped", "compiled routed_ffn: no gradient for the routing weights",
             "mom/opaque.py", "none(b2, g[6]), None, g[7],", "none(b2, g[6]), None, None,",
             ("tests/test_compile.py",)),
    Mutation("cuda_graphs_torch_backend_accepted", "GraphedTrainStep accepts the torch backend (host reads)",
             "mom/cuda_graphs.py", 'if routed and (backend not in ("triton", "auto")',
             'if routed and (backend not in ("triton", "auto", "torch", "reference")', ("tests/test_cuda_graphs.py",)),
    Mutation("cuda_graphs_host_checks_not_refused", "GraphedTrainStep captures with host id checks on",
             "mom/cuda_graphs.py", "        if checks._CHECK_IDS:\n            raise ValueError(\"GraphedTrainStep:",
             "        if False:\n            raise ValueError(\"GraphedTrainStep:", ("tests/test_cuda_graphs.py",)),
    # ---- routed ops: the reference loop (mom/routed.py), the few-token path under autocast (mom/few_tokens.py) ----
    Mutation("reference_routing_weights_ignored", "the reference routed_linear sums its picks unweighted",
             "mom/routed.py", "            out = out * w[:, None]\n        y = y.index_add(0, tok, out.to(y.dtype))",
             "            out = out\n        y = y.index_add(0, tok, out.to(y.dtype))", TORCH_TESTS),
    Mutation("few_tokens_autocast_residual_to_bf16", "the few-token path under autocast adds the fp32 residual in "
             "bf16 (the residual stream becomes bf16)", "mom/few_tokens.py",
             "    if residual.dtype != slots.dtype:  # under autocast: the sum in the residual's (wider) dtype, as "
             "residual + y\n        return residual + torch.bmm(g, slots).squeeze(1)\n", "",
             ("tests/test_few_tokens_autocast.py",)),
    # ---- the efficiency report's counting (benchmarks/efficiency.py, benchmarks/common.py) ----
    Mutation("efficiency_kv_ratio_of_itself", "the KV cache ratio divides a model's cache by its own",
             "benchmarks/efficiency.py",
             "kvb = kv_elements(cfg, batch, seq_len), kv_elements(row_config(base), batch, seq_len)",
             "kvb = kv_elements(cfg, batch, seq_len), kv_elements(cfg, batch, seq_len)", EFFICIENCY_TESTS),
    Mutation("efficiency_router_width_not_scaled", "reduced sizes keep the full router width",
             "benchmarks/efficiency.py", "router_dim=max(4, round(cfg.router_dim * s))", "router_dim=cfg.router_dim",
             EFFICIENCY_TESTS),
    Mutation("efficiency_ratio_from_analytic_flops", "the measured FLOPs ratio uses the analytic counts even when "
             "the picks were counted", "benchmarks/efficiency.py",
             'key = "GFLOPs_counted" if "GFLOPs_counted" in r else "GFLOPs_analytic"', 'key = "GFLOPs_analytic"',
             EFFICIENCY_TESTS),
    Mutation("common_csv_new_column_drops_old_rows", "a CSV row with a new column rewrites the file without the "
             "old rows", "benchmarks/common.py", "w.writerows(old_rows + rows)", "w.writerows(rows)",
             ("benchmarks/test_common.py",)),
    Mutation("common_csv_torn_last_line_joined", "rows appended to a file without a final newline join its last "
             "line", "benchmarks/common.py",
             'buf.write(text if not text or text.endswith("\\n") else text + "\\r\\n")', "buf.write(text)",
             ("benchmarks/test_common.py",)),
    # ---- the Llama family (mom/blocks.py, mom/hf_config.py, mom/convert.py; the kernels' RMS / SWIGLU / rotary) ----
    Mutation("rms_norm_centred", "RMSNorm subtracts the mean (a LayerNorm without beta)", "mom/blocks.py",
             "xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)",
             "xf * torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)", LLAMA_TESTS),
    Mutation("rotate_half_sign", "rotate_half returns (x2, -x1): the rotation runs backwards", "mom/blocks.py",
             "return torch.cat([-x2, x1], dim=-1)", "return torch.cat([x2, -x1], dim=-1)", LLAMA_TESTS),
    Mutation("rope_theta_ignored", "the rotary tables use the base 10000 whatever rope_theta says", "mom/blocks.py",
             "inv = 1.0 / self.theta ** (", "inv = 1.0 / 10000.0 ** (", LLAMA_TESTS),
    Mutation("swiglu_halves_swapped", "SwiGLU takes silu of the up half times the gate half", "mom/blocks.py",
             "return F.silu(gate) * up", "return F.silu(up) * gate", LLAMA_TESTS),
    Mutation("qkv_heads_k_v_swapped", "the fused projection's K and V column blocks read the other way round",
             "mom/blocks.py", "q, k, v = qkv.split([n_head * hd, kv_heads * hd, kv_heads * hd], dim=-1)",
             "q, v, k = qkv.split([n_head * hd, kv_heads * hd, kv_heads * hd], dim=-1)", LLAMA_TESTS),
    Mutation("hf_config_kv_heads_ignored", "from_hf reads every config as multi-head (num_key_value_heads dropped)",
             "mom/hf_config.py", 'num_key_value_heads=d.get("num_key_value_heads") or H', "num_key_value_heads=H",
             LLAMA_TESTS),
    Mutation("hf_config_qwen2_biases_dropped", "a Qwen2 config is read without its q/k/v biases",
             "mom/hf_config.py", 'attention_bias=mt == "qwen2"', "attention_bias=False", LLAMA_TESTS),
    Mutation("hf_config_rope_theta_default", "from_hf ignores the checkpoint's RoPE base", "mom/hf_config.py",
             'theta = params.get("rope_theta", d.get("rope_theta", 10000.0))', "theta = 10000.0", LLAMA_TESTS),
    Mutation("convert_gate_up_swapped", "a Llama layer's c_fc is up | gate instead of gate | up", "mom/convert.py",
             '("mlp.c_fc.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))',
             '("mlp.c_fc.weight", ("mlp.up_proj.weight", "mlp.gate_proj.weight"))', LLAMA_TESTS),
    Mutation("gemm_swiglu_halves_swapped", "the fused FFN's epilogue takes silu of the up accumulator", GEMM,
             "acc = _swiglu_of(acc, acc2, _sigmoid(acc))", "acc = _swiglu_of(acc2, acc, _sigmoid(acc2))",
             KERNEL_LLAMA_TESTS),
    Mutation("gemm_swiglu_d_up_uses_up", "the SwiGLU backward's d up multiplies by up instead of gate", GEMM,
             "d_up = acc * pre * th", "d_up = acc * up * th", KERNEL_LLAMA_TESTS),
    Mutation("gathers_rms_unbiased", "the gathered RMSNorm divides the sum of squares by N - 1", GA,
             "rstd = 1.0 / tl.sqrt(s2 / N + eps)", "rstd = 1.0 / tl.sqrt(s2 / (N - 1) + eps)", KERNEL_LLAMA_TESTS),
    Mutation("reductions_rms_backward_centred", "the RMSNorm input gradient subtracts the mean gradient (LayerNorm's "
             "rule)", RED, "            d = acc - xhat * c2[:, None]\n",
             "            d = acc - xhat * c2[:, None] - (tl.sum(acc, axis=1) / N)[:, None]\n", KERNEL_LLAMA_TESTS),
    Mutation("decode_rms_centred", "the decode path's RMSNorm statistics subtract the mean", "mom_kernels/decode.py",
             "    if not RMS:\n        for k0 in range(0, N_in, BLOCK_K):",
             "    if True:\n        for k0 in range(0, N_in, BLOCK_K):", KERNEL_LLAMA_TESTS),
    Mutation("rotary_kernel_sign", "the rotary kernel rotates the first half with + x2 sin", "mom_kernels/rotary.py",
             "y1 = x1 * c - x2 * s", "y1 = x1 * c + x2 * s", KERNEL_LLAMA_TESTS),
    Mutation("rotary_backward_not_transposed", "the rotary backward rotates forward again (sin not negated)",
             "mom_kernels/rotary.py", "        if BACKWARD:\n            s = -s\n", "", KERNEL_LLAMA_TESTS),
    # ---- capacity routing (mom/capacity.py, mom_kernels/capacity.py) ----
    Mutation("capacity_tokens_floor", "a module takes floor(c T) tokens instead of ceil(c T)", "mom/config.py",
             "math.ceil(self.capacity_of(pool_size) * seq_len - 1e-9)",
             "math.floor(self.capacity_of(pool_size) * seq_len + 1e-9)", CAPACITY_TESTS),
    Mutation("capacity_threshold_moved", "inference takes a token when its logit is >= 1 (not >= 0)",
             "mom/capacity.py", "        sel = logits >= 0\n", "        sel = logits >= 1\n", CAPACITY_TESTS),
    Mutation("capacity_weights_unscaled", "a taken pick's weight ignores capacity_scale", "mom/capacity.py",
             "torch.where(sel, config.capacity_scale * scores, torch.zeros_like(scores))",
             "torch.where(sel, scores, torch.zeros_like(scores))", CAPACITY_TESTS),
    Mutation("capacity_bce_target_inverted", "the aux loss teaches the routers the opposite choice",
             "mom/capacity.py", "F.binary_cross_entropy_with_logits(z, sel.to(z.dtype))",
             "F.binary_cross_entropy_with_logits(z, (~sel).to(z.dtype))", CAPACITY_TESTS),
    Mutation("capacity_kernel_ties_to_later", "the capacity kernel breaks ties toward the later token",
             "mom_kernels/capacity.py", "(offs_j[None, :] < offs_i[:, None])", "(offs_j[None, :] > offs_i[:, None])",
             CAPACITY_TESTS),
    Mutation("capacity_kernel_sigmoid_grad", "the capacity backward drops the sigmoid's derivative (1 - s)",
             "mom_kernels/capacity.py", "dz = ds * s * (1.0 - s)", "dz = ds * s", CAPACITY_TESTS),
    Mutation("slot_loop_last_slot_dropped", "the torch backend's slot-by-slot combine (one slot per module) "
             "stops before the last slot", "mom/routed.py", "        for k in range(1, K):\n            if w is None:",
             "        for k in range(1, K - 1):\n            if w is None:", CAPACITY_TESTS),
    Mutation("slot_loop_weight_grad_first_slot", "the slot-by-slot routing-weight gradient dots every slot with "
             "the first slot's row", "mom/routed.py", "torch.linalg.vecdot(rows[slot[:, k]], grad)",
             "torch.linalg.vecdot(rows[slot[:, 0]], grad)", CAPACITY_TESTS),
    # ---- the drop-in block (mom/block.py), the command line (mom/cli.py), the checkpoint format ----
    Mutation("block_always_causal", "MoMBlock(causal=False) still attends causally", "mom/block.py",
             "self.layer.causal = causal", "self.layer.causal = True", ("tests/test_block.py",)),
    Mutation("block_aux_loss_first_only", "mom.aux_loss returns the first block's loss, not the sum",
             "mom/block.py", "return torch.stack(losses).sum()", "return losses[0]", ("tests/test_block.py",)),
    Mutation("cli_underscore_alias_dropped", "the old underscore spellings are no longer accepted", "mom/cli.py",
             "return super().parse_known_args(self.hyphenate(args), namespace)",
             "return super().parse_known_args(args, namespace)", ("tests/test_cli.py",)),
    Mutation("cli_error_without_its_source", "a command-line error no longer says it is the command line",
             "mom/cli.py", 'f"{self.prog}: error on the command line: ', 'f"{self.prog}: error: ',
             ("tests/test_cli.py",)),
    Mutation("train_cli_source_lost", "mom.train blames the config file for a bad option", "mom/train.py",
             'for key in (field, f"model_overrides.{field}", field.split(".")[0]):', "for key in ():",
             ("tests/test_hardening_config.py",)),
    Mutation("train_checkpoint_old_config", "a run's checkpoint writes the old config.json (no model_type)",
             "mom/train.py", 'write_config(cfg, os.path.join(tmp, "config.json"))',
             'atomic_write_text(os.path.join(tmp, "config.json"), cfg.to_json())',
             ("tests/test_train.py::test_a_runs_checkpoint_loads_with_transformers_auto_classes",)),
    Mutation("convert_top_k_under_its_own_name", "config.json keeps top_k (transformers reads it as a sampling "
             "setting)", "mom/convert.py", 'd[HF_TOP_K] = d.pop("top_k")', 'd["top_k"] = d.pop("top_k")',
             ("tests/test_checkpoint_format.py",)),

]


# ----------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------

# A pytest plugin written into the copy: records the files `mom`, `mom_kernels` and the mutated module were
# imported from (None: never imported).
_PLUGIN = '''
import json, os, sys
def pytest_sessionfinish(session, exitstatus):
    names = ["mom", "mom_kernels"] + [n for n in [os.environ.get("MUTATION_MODULE")] if n]
    out = {n: getattr(sys.modules.get(n), "__file__", None) for n in names}
    with open(os.environ["MUTATION_IMPORTS_JSON"], "w") as f:
        json.dump(out, f)
'''


def repo_files() -> List[str]:
    """Tracked files plus untracked ones git does not ignore, as in the working tree (deleted ones left out)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))})


def snapshot(rev: Optional[str]) -> str:
    """One copy of the working tree (rev None) or of a commit, taken once: every run copies it, so edits made
    in the checkout while the check runs do not leak into some mutations and not others."""
    dst = tempfile.mkdtemp(prefix="mom_mutation_snapshot_")
    if rev:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
    else:
        for f in repo_files():
            os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    with open(os.path.join(dst, "_mutation_imports.py"), "w") as fh:
        fh.write(_PLUGIN)
    return dst


def make_copy(snap: str) -> str:
    dst = tempfile.mkdtemp(prefix="mom_mutation_")
    shutil.copytree(snap, dst, dirs_exist_ok=True)
    return dst


class MutationError(Exception):
    pass


def apply(m: Mutation, root: str) -> None:
    """Make the substitution in the copy; `old` must occur exactly once."""
    path = os.path.join(root, m.path)
    if not os.path.isfile(path):
        raise MutationError(f"{m.name}: {m.path} does not exist")
    text = Path(path).read_text()
    n = text.count(m.old)
    if n != 1:
        raise MutationError(f"{m.name}: the text to replace occurs {n} times in {m.path} (must be exactly once; "
                            f"update this mutation in tests/mutations.py):\n    {m.old!r}")
    with open(path, "w") as fh:
        fh.write(text.replace(m.old, m.new))


def existing(tests: Sequence[str], root: str) -> Tuple[List[str], List[str]]:
    """(the tests whose file exists in root, the others); a test is a file or a pytest node id file::name."""
    have = [t for t in tests if os.path.isfile(os.path.join(root, t.split("::")[0]))]
    return have, [t for t in tests if t not in have]


def package_files(root: str = ROOT) -> List[str]:
    """The modules the table is meant to cover: every mom/*.py except the package's __init__ (re-exports only),
    and the benchmarks' counting code (what the efficiency report's figures come from)."""
    mods = sorted(f"mom/{f}" for f in os.listdir(os.path.join(root, "mom")) if f.endswith(".py") and f != "__init__.py")
    return mods + list(COUNTING_CODE)


def list_text(chosen: Sequence[Mutation]) -> str:
    """--list: the mutations grouped by the file they mutate (what each breaks, the tests it runs), then one line
    per module: how many mutations cover it; modules of the package with fewer than two are named last."""
    by_file: dict = {}
    for m in chosen:
        by_file.setdefault(m.path, []).append(m)
    lines = []
    for path in sorted(by_file):
        lines.append(f"== {path} ({len(by_file[path])})")
        for m in by_file[path]:
            lines.append(f"  {m.name:46s} {m.what}\n  {'':46s} tests: {' '.join(m.tests)}")
    lines.append("\nmutations per module:")
    for path in sorted(set(by_file) | set(package_files())):
        lines.append(f"  {len(by_file.get(path, [])):3d}  {path}")
    thin = [p for p in package_files() if len(by_file.get(p, [])) < 2]
    lines.append(f"{len(chosen)} mutations over {len(by_file)} files"
                 + (f"; fewer than two: {', '.join(thin)}" if thin else "; every module of mom/ and the benchmarks' "
                    "counting code has at least two"))
    return "\n".join(lines)


def run_pytest(root: str, tests: Sequence[str], stop_first: bool, deselect: Sequence[str] = (),
               timeout: int = TIMEOUT_S, module: str = "") -> dict:
    """Run pytest in the copy. Returns rc, failed node ids, seconds, the import check and the output tail."""
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["MUTATION_IMPORTS_JSON"] = os.path.join(root, "_imports.json")
    env["MUTATION_MODULE"] = module
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "_mutation_imports", "-rfE",
           *(["-x"] if stop_first else []), *tests]
    for d in deselect:
        cmd += ["--deselect", d]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                         else (e.stdout or ""))
    seconds = time.time() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S.*?)(?: - .*)?$", out, flags=re.M)  # ids may hold spaces
    imports = {}
    try:
        imports = json.load(open(env["MUTATION_IMPORTS_JSON"]))
        os.remove(env["MUTATION_IMPORTS_JSON"])
    except (OSError, ValueError):
        pass
    bad = [f"{n} from {f}" for n, f in imports.items() if f and not os.path.realpath(f).startswith(
        os.path.realpath(root) + os.sep)]
    return dict(rc=rc, failed=failed, seconds=seconds, imports=imports, bad_imports=bad, tail=out[-3000:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run (then a test that fails anyway counts as a kill)")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per test run (default %(default)s)")
    ap.add_argument("--rev", help="mutate this commit (git archive) instead of the working tree")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "duplicate mutation names"
    chosen = MUTATIONS
    if a.only:
        unknown = [n for n in a.only if n not in names]
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
        chosen = [m for m in MUTATIONS if m.name in a.only]
    if a.list:
        print(list_text(chosen))
        return 0

    if a.rev:
        print(f"tree: commit {a.rev} = " + subprocess.run(["git", "rev-parse", "--short", a.rev], cwd=ROOT,
                                                          capture_output=True, text=True).stdout.strip())
    else:
        print("tree: the working tree, HEAD " + subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                              capture_output=True, text=True).stdout.strip()
              + " plus uncommitted changes and untracked files")
    snap = snapshot(a.rev)
    try:
        return _run(a, chosen, snap)
    finally:
        shutil.rmtree(snap, ignore_errors=True)


def _run(a, chosen: Sequence[Mutation], snap: str) -> int:
    # Every mutation's text is checked before anything runs: a stale mutation fails at once, loudly.
    errors = []
    for m in chosen:
        path = os.path.join(snap, m.path)
        n = Path(path).read_text().count(m.old) if os.path.isfile(path) else None
        if n != 1:
            errors.append(f"{m.name}: " + (f"{m.path} does not exist" if n is None else
                                           f"the text to replace occurs {n} times in {m.path} (must be exactly "
                                           f"once; update tests/mutations.py):\n    {m.old!r}"))
    if errors:
        print("CANNOT APPLY (a refactor moved the text these mutations replace):", file=sys.stderr)
        for e in errors:
            print("  " + e, file=sys.stderr)
        return 1

    missing_all = sorted({t for m in chosen for t in m.tests if t not in existing(m.tests, snap)[0]})
    for t in missing_all:
        print(f"note: {t} does not exist here; left out of every run")

    deselect: List[str] = []
    if not a.no_baseline:
        tests = sorted({t for m in chosen for t in existing(m.tests, snap)[0]})
        base = make_copy(snap)
        try:
            print(f"baseline: {len(tests)} test files on the unmutated copy ...", flush=True)
            r = run_pytest(base, tests, stop_first=False, timeout=max(a.timeout, 3600))
        finally:
            shutil.rmtree(base, ignore_errors=True)
        if r["bad_imports"]:
            print("the tests imported the checkout, not the copy: " + "; ".join(r["bad_imports"]), file=sys.stderr)
            return 1
        if r["rc"] is None:
            print("baseline timed out", file=sys.stderr)
            return 1
        deselect = r["failed"]
        print(f"baseline: {r['seconds']:.0f} s, {len(deselect)} failing test(s) deselected below"
              + "".join(f"\n    {d}" for d in deselect), flush=True)
        if r["rc"] not in (0, 1):
            print("baseline did not run cleanly:\n" + r["tail"], file=sys.stderr)
            return 1

    results = []
    for m in chosen:
        tests, _ = existing(m.tests, snap)
        copy = make_copy(snap)
        try:
            apply(m, copy)
            print(f"{m.name} ...", end=" ", flush=True)
            module = m.path[:-3].replace("/", ".")
            r = run_pytest(copy, tests, stop_first=True, deselect=deselect, timeout=a.timeout, module=module)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        if r["bad_imports"]:
            verdict, by = "ERROR", "imported the checkout: " + "; ".join(r["bad_imports"])
        elif r["rc"] is None:
            verdict, by = "KILLED", f"timeout after {a.timeout} s"
        elif r["rc"] < 0:  # the test process died (e.g. an out-of-bounds access under the interpreter)
            verdict, by = "KILLED", f"crash (signal {-r['rc']}) while running {' '.join(tests)}"
        elif r["rc"] == 0:
            verdict, by = "SURVIVED", "" if r["imports"].get(module) else f"(the tests never imported {module})"
        elif r["failed"]:
            verdict, by = "KILLED", r["failed"][0]
        else:
            verdict, by = "ERROR", f"pytest exit code {r['rc']} without a failing test:\n{r['tail']}"
        print(f"{verdict} ({r['seconds']:.0f} s) {by}", flush=True)
        results.append(dict(name=m.name, what=m.what, file=m.path, verdict=verdict, by=by,
                            seconds=round(r["seconds"]), tests=tests))

    print("\n| mutation | file | result | killed by | s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['file']} | {r['verdict']} | {r['by'].splitlines()[0] if r['by'] else ''} "
              f"| {r['seconds']} |")
    n_killed = sum(r["verdict"] == "KILLED" for r in results)
    print(f"\n{n_killed} of {len(results)} killed")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(deselected=deselect, missing=missing_all, results=results), fh, indent=1)
    return 0 if all(r["verdict"] == "KILLED" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
