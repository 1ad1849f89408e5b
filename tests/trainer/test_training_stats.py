"""The per-step training statistics against an independent numpy account of the same steps:
weights snapshotted around each real AdamW step, Adam's moments re-accumulated from the
gradients the optimizer saw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from personalize.training_stats import STAT_NAMES, UpdateStatistics

BETAS, EPS, WD, MAX_NORM = (0.9, 0.999), 1e-8, 1e-2, 0.5
TRAINED_ROWS = [1, 4]


class Toy(torch.nn.Module):
    """A linear layer, an embedding table of which two rows train, and a bias used only on
    even steps (AdamW skips a parameter without a gradient)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.table = torch.nn.Embedding(6, 4)
        self.sometimes = torch.nn.Parameter(torch.randn(3))

    def forward(self, x, ids, step):
        out = self.linear(x + self.table(ids).mean(1))
        return out + self.sometimes if step % 2 == 0 else out


def run(steps: int, horizon: int = 3, grad_scale: float = 1.0):
    torch.manual_seed(0)
    model = Toy()
    frozen = model.table.weight.detach().clone()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=0.05, betas=BETAS, eps=EPS, weight_decay=WD)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    stats = UpdateStatistics(params, optimizer, trained_rows=[(model.table.weight, TRAINED_ROWS)], horizon=horizon)
    trained = {id(model.table.weight): TRAINED_ROWS}

    def view(p, t):  # what trains of p, as numpy
        t = t.detach().double().numpy()
        return t[trained[id(p)]] if id(p) in trained else t

    got, records = [], []
    for step in range(steps):
        x, ids = torch.randn(5, 4), torch.randint(0, 6, (5, 2))
        ((model(x, ids, step) ** 2).mean() * grad_scale).backward()
        raw = {id(p): view(p, p.grad) for p in params if p.grad is not None}
        lr = optimizer.param_groups[0]["lr"]
        stats.observe_gradients(grad_scale)
        for p in params:
            if p.grad is not None:
                p.grad /= grad_scale
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        clipped = {id(p): view(p, p.grad) for p in params if p.grad is not None}
        before = {id(p): view(p, p) for p in params}
        optimizer.step()
        with torch.no_grad():  # what Textual Inversion's keeper does after each step
            keep = torch.ones(6, dtype=torch.bool)
            keep[TRAINED_ROWS] = False
            model.table.weight[keep] = frozen[keep]
        got.append(stats.after_step())
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        records.append({"lr": lr, "raw": raw, "clipped": clipped, "before": before,
                        "after": {id(p): view(p, p) for p in params}})
    return params, got, records


def expected(params, records, horizon):
    """The statistics from the snapshots and a numpy AdamW moment account."""
    m = {id(p): 0.0 for p in params}
    v = {id(p): 0.0 for p in params}
    t = {id(p): 0 for p in params}
    previous, snrs, out = None, [], []
    for r in records:
        grad_norm = math.sqrt(sum((g**2).sum() for g in r["raw"].values()))
        for key, g in r["clipped"].items():
            m[key] = BETAS[0] * m[key] + (1 - BETAS[0]) * g
            v[key] = BETAS[1] * v[key] + (1 - BETAS[1]) * g**2
            t[key] += 1
        update = np.concatenate([(r["after"][id(p)] - r["before"][id(p)]).ravel() for p in params])
        weights = np.concatenate([r["before"][id(p)].ravel() for p in params])
        ratios = []
        for p in params:
            k = id(p)
            if t[k]:
                m_hat, v_hat = m[k] / (1 - BETAS[0] ** t[k]), v[k] / (1 - BETAS[1] ** t[k])
                ratios.append((m_hat[v_hat > 0] ** 2 / v_hat[v_hat > 0]).ravel())
        snrs.append(np.concatenate(ratios).mean())
        cosine = math.nan if previous is None else update @ previous / np.linalg.norm(update) / np.linalg.norm(previous)
        out.append({"lr": r["lr"], "grad_norm": grad_norm, "update_ratio": np.linalg.norm(update) / np.linalg.norm(weights),
                    "update_cosine": cosine, "adam_snr": float(np.mean(snrs[-horizon:]))})
        previous = update
    return out


def test_statistics_match_an_independent_account_of_the_same_steps():
    params, got, records = run(8)
    want = expected(params, records, horizon=3)
    assert all(tuple(g) == STAT_NAMES for g in got)
    assert math.isnan(got[0]["update_cosine"])  # nothing to compare the first update with
    for step, (g, w) in enumerate(zip(got, want)):
        for name in STAT_NAMES:
            if name == "update_cosine" and step == 0:
                continue
            # the update is solved from AdamW's state, the snapshots differ in fp32 rounding only
            assert g[name] == pytest.approx(w[name], rel=2e-4, abs=1e-7), (step, name)
    assert len({round(g["lr"], 6) for g in got}) == 8  # the schedule's lr of each step, not the next one
    assert any(r["raw"] and math.sqrt(sum((x**2).sum() for x in r["raw"].values())) > MAX_NORM for r in records)


def test_a_loss_scale_is_divided_out_of_the_gradient_norm():
    plain = run(3)[1]
    scaled = run(3, grad_scale=1024.0)[1]
    assert [s["grad_norm"] for s in scaled] == pytest.approx([s["grad_norm"] for s in plain], rel=1e-5)


def test_a_skipped_step_reports_no_update():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    stats = UpdateStatistics(model.parameters(), optimizer)
    model(torch.ones(1, 2)).sum().backward()
    stats.observe_gradients()  # then no optimizer.step(), as GradScaler does on an overflow
    skipped = stats.after_step()
    assert math.isnan(skipped["update_ratio"]) and math.isnan(skipped["adam_snr"]) and skipped["grad_norm"] > 0


def test_after_step_without_observing_the_gradients_is_an_error():
    model = torch.nn.Linear(2, 2)
    stats = UpdateStatistics(model.parameters(), torch.optim.AdamW(model.parameters()))
    with pytest.raises(RuntimeError, match="observe_gradients"):
        stats.after_step()


def test_only_adamw_state_is_understood():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="AdamW"):
        UpdateStatistics(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
