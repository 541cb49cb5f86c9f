"""SparseVLM parity (versions 1.0 and 2.0): the official rater / rank / recycle rule against the
workbench's executed stage.

Official code: Gumpest/SparseVLMs (HEAD), llava/model/language_model/
- modelling_sparse_llama.py lines 199-204: raters ``m_v_t = (V @ T^T).softmax(2).mean(1)`` on the
  decoder input (V: the image rows, T: every row after the image), ``where(m_v_t > m_v_t.mean())``;
- lines 229-239: at a pruning layer the layer runs (sdpa, returning its softmax ``attn_logits``,
  lines 688-696) and its output is pruned;
- v2.0 lines 242-251: ``attn_logits / rope_weights`` with ``rope_weights`` the scaled product of
  all-ones q and k after RoPE at the current position ids; line 257 and score.py lines 48-55
  (``select_attn_head_by_sum``): the 14 heads with the largest rater-to-visual sum;
- score.py lines 23-46 (``attn_postprocess_topk``): head mean, rater rows, visual columns, rater mean,
  ``topk(min(sparse_token_list[stage], v_token_num - 1))``; lines 11-14: the schedules per version;
- v1.0 lines 275-307: deleted tokens scored by the same relation, the top ``int(0.3 * d) + 1``
  clustered by ``cluster_and_merge`` (utils.py lines 179-239: distances / sqrt(C), density from the
  ``cluster_num`` nearest, distance to the nearest denser token, ``topk(dist * density)`` centres,
  every token to its nearest centre) into ``int(m / 10) + 1`` averaged tokens (each member over the
  cluster size + 1e-6, lines 214-237, in ``topk`` centre order), concatenated after the kept visual
  tokens and before the text (lines 292-298); positions re-numbered 0..L'-1 (line 302); v2.0 lines
  273-274 cancel the merge and line 312 keeps the position ids.
Placement (the workbench's, not the rule's): the scaled layers 2/6/15 fold into ONE stage on the
4-layer shipped model (scoring layer 2) and on the 2-layer tiny decoders (scoring layer 0), with the
last schedule count scaled by N/576, so every selection here is a first stage. The recycled tokens
are checked twice: the plan's appended tokens (name = centre, members = cluster, in the code's order,
at the end of the visual block) and the prefill's logits against the decoder run by hand on the code's
concatenated sequence. Tolerance: the reference's ``rand * 1e-6`` density noise is left out (ties by
the lower index, as the method); the kept sets and the clusters must be identical, the logits equal
to float32 rounding (1e-4).
The code is LLaVA's (one-axis RoPE): tiny M-RoPE families are not comparable with the hand-run decoder.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, facts, jaccard, labels,
                                         language_model, layer_attention, run_pruned, torch_topk, visual_positions)
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.sparsevlm import SparseVLM
from workbench.pruning.run import run_method

# score.py lines 11-14 (the last entry: the folded stage's count)
SCHEDULES = {"1_0": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
             "2_0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}}
BUDGETS = {192: 192 / 576, 128: 128 / 576, 96: 96 / 576, 64: 64 / 576}


def official_raters(adapter, prepared) -> np.ndarray:
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
    positions = visual_positions(prepared)
    v_t, t_t = embeds[torch.as_tensor(positions)], embeds[int(positions.max()) + 1:]
    m_v_t = (v_t @ t_t.T).softmax(1).mean(0)
    return torch.where(m_v_t > m_v_t.mean())[0].numpy()


def rope_weights(lm, states, positions, head_dim: int) -> torch.Tensor:
    """[S, S] lines 243-250: all-ones q and k after RoPE, q k^T / sqrt(d)."""
    ones = torch.ones(1, 1, states.shape[1], head_dim)
    cos, sin = lm.rotary_emb(states, positions)
    q, k = apply_rotary_pos_emb(ones, ones, cos, sin)
    return (q @ k.transpose(2, 3))[0, 0] / math.sqrt(head_dim)


def official_cluster(x: torch.Tensor, cluster_num: int):
    """utils.py cluster_and_merge without the density noise: (centre rows, cluster of each row)."""
    dist_matrix = torch.cdist(x, x) / (x.shape[1] ** 0.5)
    dist_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False).values
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).double()
    dist = (dist_matrix * mask + dist_matrix.max() * (1 - mask)).min(dim=-1).values
    index_down = torch_topk(dist * density, cluster_num)
    index_down = index_down[np.argsort(-(dist * density).numpy()[index_down], kind="stable")]
    idx_cluster = dist_matrix[torch.as_tensor(index_down)].argmin(dim=0)
    idx_cluster[torch.as_tensor(index_down)] = torch.arange(cluster_num)
    return index_down, idx_cluster.numpy()


def official_sparsevlm(adapter, prepared, version: str, scoring_layer: int, count: int):
    """(kept original tokens, centres, {frozenset(cluster)}) of the one stage."""
    raters = official_raters(adapter, prepared)
    found = {}

    def cut(i, lm, states, positions, kinds):
        rows = np.flatnonzero(kinds >= 0)
        text_start = int(rows.max()) + 1
        if i == scoring_layer:
            rater_rows = raters + text_start
            probs = layer_attention(lm, i, states, positions, rater_rows).double()   # [H, R, S]
            if version == "2_0":
                head_dim = lm.layers[i].self_attn.head_dim
                probs = probs / rope_weights(lm, states, positions, head_dim)[torch.as_tensor(rater_rows)][None]
                per_head = probs[:, :, torch.as_tensor(rows)].sum(dim=(1, 2))
                keep_heads = round(14 * len(probs) / 32)
                probs = probs[torch.as_tensor(torch_topk(per_head, keep_heads))]
            relation = probs.mean(0)[:, torch.as_tensor(rows)].mean(0)
            top = torch_topk(relation, min(count, len(rows) - 1))
            found.update(relation=relation, top=top, rows=rows)
            return None
        if i == scoring_layer + 1:
            rows, top, relation = found["rows"], found["top"], found["relation"]
            kept = kinds[rows[top]]
            found["kept"], found["centres"], found["clusters"] = kept, np.array([], dtype=int), set()
            if version == "1_0":
                deleted = np.setdiff1d(np.arange(len(rows)), top)
                n_merge = int(len(deleted) * 0.3) + 1
                chosen = deleted[torch_topk(relation[torch.as_tensor(deleted)], n_merge)]
                cluster_num = int(n_merge / 10) + 1
                index_down, idx_cluster = official_cluster(states[0, torch.as_tensor(rows[chosen])].double(),
                                                           cluster_num)
                tokens = kinds[rows[chosen]]
                found["centres"] = tokens[index_down]
                found["clusters"] = {frozenset(tokens[idx_cluster == c].tolist()) for c in range(cluster_num)}
                found["ordered"] = [tokens[idx_cluster == c] for c in range(cluster_num)]
            return np.union1d(found["kept"], found["centres"]), "reindex" if version == "1_0" else "original"
        return None

    run_pruned(adapter, prepared, cut)
    return found["kept"], found["centres"], found["clusters"], found.get("ordered", [])


@torch.no_grad()
def official_recycled_logits(adapter, prepared, scoring_layer: int, kept, ordered) -> torch.Tensor:
    """[V] the prefill's last logits with version 1.0's sequence made by hand: after the scoring layer
    the kept rows, the clusters' averages (of that layer's output) concatenated right after the kept
    visual rows, positions 0..L'-1 (lines 290-302)."""
    model = eager_model(adapter)
    lm = language_model(model)
    states = eager_forward(adapter, prepared).hidden_states[0].clone()
    positions = torch.arange(states.shape[1]).unsqueeze(0)
    kinds = np.full(states.shape[1], -1)
    image = visual_positions(prepared)
    kinds[image] = np.arange(prepared.layout.n_tokens)
    for i, layer in enumerate(lm.layers):
        if i == scoring_layer + 1:
            row = {int(k): r for r, k in enumerate(kinds) if k >= 0}
            merged = [sum(states[0, row[int(t)]] for t in members) / (len(members) + 1e-6) for members in ordered]
            select = states[:, np.flatnonzero((kinds < 0) | np.isin(kinds, kept))]
            split = int(image.min()) + len(kept)  # v_token_start + select_vis_token_num
            states = torch.cat([select[:, :split], torch.stack(merged)[None], select[:, split:]], 1)
            positions = torch.arange(states.shape[1]).unsqueeze(0)
        out = layer(states, attention_mask=causal_mask(states.shape[1]), position_ids=positions,
                    position_embeddings=lm.rotary_emb(states, positions))
        states = out[0] if isinstance(out, tuple) else out
    return adapter.output_head()(lm.norm(states))[0, -1].float()


def check(label, version):
    adapter, prepared = case(label)
    f = facts(adapter)
    n = prepared.layout.n_tokens
    method = SparseVLM(version=version)
    for reference, budget in BUDGETS.items():
        context = SelectionContext(prepared.layout, budget, None, f)
        assert method.reference_budget(context) == reference
        ((scoring_layer, count),) = method.scoring_schedule(context)  # one folded stage on these decoders
        assert count == round(SCHEDULES[version][reference][-1] * n / 576)
        execution = run_method(adapter, prepared, method, budget, max_new_tokens=1)
        (stage,) = execution.plan.stages
        assert stage.where == scoring_layer + 1
        kept, centres, clusters, ordered = official_sparsevlm(adapter, prepared, version, scoring_layer, count)
        assert jaccard(stage.kept, np.union1d(kept, centres)) == 1.0, (label, reference)
        assert len(stage.kept) == len(kept) + len(centres)
        assert stage.merges == ()
        # one appended token per cluster, named by its centre, in the code's order, after the kept visual tokens
        assert [a.token for a in stage.appends] == centres.tolist(), (label, reference)
        assert [frozenset(a.members) for a in stage.appends] == [frozenset(c.tolist()) for c in ordered]
        assert {frozenset(a.members) for a in stage.appends} == clusters
        assert all(a.after is None and np.allclose(a.weights, 1 / (len(a.members) + 1e-6)) for a in stage.appends)
        if version == "1_0":
            expected = official_recycled_logits(adapter, prepared, scoring_layer, kept, ordered)
            torch.testing.assert_close(execution.logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_version_1_equals_the_official_rule(label):
    check(label, "1_0")


@pytest.mark.parametrize("label", labels(("llava",)))
def test_version_2_equals_the_official_rule(label):
    check(label, "2_0")
