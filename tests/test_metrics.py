"""metrics.AcceptanceAccumulator against slow per-position loops, on random padded data and on
hand-made cases whose runs and shifted matches are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metrics import THRESHOLDS, AcceptanceAccumulator, capped_mean, runs_from_every_start, strict_json, tau_key


def random_batch(seed: int, b: int = 5, t: int = 9, d: int = 16, v: int = 23, shift: int = 0):
    """Random states with right padding (one sample fully padded, one full), NaN in the padding,
    an LM head, and target tokens = the target states' own argmax (as the extraction stores them)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, t, d, generator=g)
    # pred = target (at t + shift) + noise of varying size, so cosines spread over the thresholds
    scale = torch.rand(b, t, 1, generator=g) * 0.9
    pred = target.roll(-shift, dims=1) + scale * torch.randn(b, t, d, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[-1] = 0, t
    mask = torch.arange(t)[None] < lengths[:, None]
    pred[~mask] = float("nan")  # padding must never leak into a metric
    weight = torch.randn(v, d, generator=g)
    tokens = (target @ weight.T).argmax(-1)
    tokens[~mask] = 0
    return pred, target, mask, weight, tokens


def brute_force(pred, target, mask, weight, tokens, predicts, thresholds, gamma_prefill, gamma_decode):
    """Every metric with explicit Python loops over samples and positions."""
    b = pred.shape[0]
    cos_all, acc = [], {tau: [] for tau in thresholds}
    runs_cos = {tau: [] for tau in thresholds}
    top1, top5, tok_runs = [], [], []
    sh1, sh5, starts = [], [], []
    cond = {tau: [0, 0] for tau in thresholds}
    shift = 1 if predicts == "next" else 0

    def draft(i, j):
        logits = pred[i, j] @ weight.T
        return logits.topk(5).indices.tolist()

    for i in range(b):
        n = int(mask[i].sum())
        pairs = list(range(n - shift))  # positions j whose pair (j, j+shift) is valid
        for tau in thresholds:
            run = 0
            for j in pairs:
                if F.cosine_similarity(pred[i, j], target[i, j + shift], dim=0) > tau:
                    run += 1
                else:
                    break
            if pairs:
                runs_cos[tau].append(run)
        for j in pairs:
            c = float(F.cosine_similarity(pred[i, j], target[i, j + shift], dim=0))
            cos_all.append(c)
            m = draft(i, j)[0] == int(tokens[i, j + shift])
            for tau in thresholds:
                acc[tau].append(c > tau)
                if c > tau:
                    cond[tau][0] += 1
                    cond[tau][1] += int(m)
        run = 0
        for j in range(n):
            hit = draft(i, j)[0] == int(tokens[i, j])
            top1.append(hit)
            top5.append(int(tokens[i, j]) in draft(i, j))
        for j in range(n):
            if draft(i, j)[0] == int(tokens[i, j]):
                run += 1
            else:
                break
        if n:
            tok_runs.append(run)
        if predicts == "next":
            for j in pairs:
                sh1.append(draft(i, j)[0] == int(tokens[i, j + 1]))
                sh5.append(int(tokens[i, j + 1]) in draft(i, j))
                k = 0
                while k < gamma_decode and j + k in pairs and draft(i, j + k)[0] == int(tokens[i, j + k + 1]):
                    k += 1
                starts.append(k)

    def mean(xs):
        return sum(xs) / len(xs) if xs else math.nan

    out = {"num_positions": len(cos_all), "cos_mean": mean(cos_all)}
    for tau in thresholds:
        out[f"accept@{tau_key(tau)}"] = mean(acc[tau])
        out[f"consecutive@{tau_key(tau)}"] = mean(runs_cos[tau])
        out[f"p_match_given_cos>{tau_key(tau)}"] = cond[tau][1] / cond[tau][0] if cond[tau][0] else math.nan
    out["token_top1"] = mean(top1)
    out["token_top5"] = mean(top5)
    out["token_consecutive"] = mean(tok_runs)
    out["prefill_free"] = mean([min(r, gamma_prefill) for r in tok_runs])
    if predicts == "next":
        out["shifted_top1"] = mean(sh1)
        out["shifted_top5"] = mean(sh5)
        out["accept_len"] = mean(starts)
    return out


def assert_close(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert key in got, key
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("predicts", ["same", "next"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_on_random_padded_data(predicts, seed):
    pred, target, mask, weight, tokens = random_batch(seed, shift=int(predicts == "next"))
    acc = AcceptanceAccumulator(predicts=predicts, lm_head=weight, gamma_prefill=3, gamma_decode=2, lm_head_batch=7)
    # two updates (split batch) must equal one pass over everything
    acc.update(pred[:2], target[:2], mask[:2], tokens[:2])
    acc.update(pred[2:], target[2:], mask[2:], tokens[2:])
    got = acc.compute()
    want = brute_force(pred, target, mask, weight, tokens, predicts, THRESHOLDS, 3, 2)
    assert_close(got, want)
    assert got["num_positions"] > 0
    assert not any(math.isnan(v) for v in got.values())  # the NaN padding never leaks into a metric


def test_target_tokens_default_to_the_target_states_argmax():
    pred, target, mask, weight, tokens = random_batch(3)
    with_tokens = AcceptanceAccumulator(predicts="next", lm_head=weight)
    with_tokens.update(pred, target, mask, tokens)
    derived = AcceptanceAccumulator(predicts="next", lm_head=weight)
    derived.update(pred, target, mask)
    assert_close(derived.compute(), with_tokens.compute())


def test_hidden_level_only_without_lm_head_and_padding_ignored():
    pred, target, mask, *_ = random_batch(4)
    acc = AcceptanceAccumulator()
    acc.update(pred, target, mask)
    got = acc.compute()
    assert set(got) == {"num_positions", "num_samples", "cos_mean"} | {
        f"{name}@{tau_key(t)}" for t in THRESHOLDS for name in ("accept", "consecutive")}
    assert got["num_positions"] == mask.sum()
    assert not math.isnan(got["cos_mean"])


def test_known_runs_and_shifted_matches():
    """Tokens are one-hot directions, so the draft token at a position is known by construction."""
    v = 8
    weight = torch.eye(v)

    def states(ids):
        return F.one_hot(torch.tensor(ids), v).float()[None]

    target_ids = [1, 2, 3, 4, 5, 6]
    mask = torch.tensor([[True] * 5 + [False]])  # position 5 is padding
    # same-position: matches at 0, 1, mismatch at 2, match at 3, 4 -> run from 0 = 2, top1 = 4/5
    same_pred = states([1, 2, 7, 4, 5, 6])
    acc = AcceptanceAccumulator(predicts="same", lm_head=weight, gamma_prefill=1)
    acc.update(same_pred, states(target_ids), mask, torch.tensor([target_ids]))
    got = acc.compute()
    assert got["token_top1"] == pytest.approx(4 / 5)
    assert got["token_consecutive"] == 2
    assert got["prefill_free"] == 1  # capped by gamma_prefill
    assert got["accept@0.95"] == pytest.approx(4 / 5)  # one-hot: cos is 1 or 0
    assert got["consecutive@0.95"] == 2
    assert acc.prefill_free_by_window()[:3] == [1, 2, 2]

    # next-position: output[t] predicts token t+1; right at t = 0, 1, 3 (pairs 0..3 valid)
    next_pred = states([2, 3, 0, 5, 0, 0])
    acc = AcceptanceAccumulator(predicts="next", lm_head=weight, gamma_decode=2)
    acc.update(next_pred, states(target_ids), mask, torch.tensor([target_ids]))
    got = acc.compute()
    assert got["shifted_top1"] == pytest.approx(3 / 4)
    assert got["shifted_consecutive"] == 2
    # runs from each start t=0..3: [2, 1, 0, 1]; capped at gamma 2 -> mean 1.0
    assert got["accept_len"] == pytest.approx(1.0)
    assert got["tokens_per_iter"] == pytest.approx(2.0)
    assert acc.accept_len_by_gamma()[:2] == [pytest.approx(0.75), pytest.approx(1.0)]
    assert got["token_top1"] == 0  # same-position: never right
    assert got["cos_mean"] == pytest.approx(3 / 4)
    assert got["p_match_given_cos>0.90"] == 1.0


def test_totals_round_trip_equals_one_accumulator():
    """Summing totals of two accumulators (what all_reduce does) equals one that saw everything."""
    pred, target, mask, weight, tokens = random_batch(5)
    parts = [AcceptanceAccumulator(predicts="next", lm_head=weight) for _ in range(2)]
    parts[0].update(pred[:3], target[:3], mask[:3], tokens[:3])
    parts[1].update(pred[3:], target[3:], mask[3:], tokens[3:])
    whole = AcceptanceAccumulator(predicts="next", lm_head=weight)
    whole.update(pred, target, mask, tokens)
    merged = AcceptanceAccumulator(predicts="next", lm_head=weight)
    totals = parts[0].totals() + parts[1].totals()
    assert totals.dtype == torch.float64 and totals.dim() == 1
    merged.load_totals(totals)
    assert_close(merged.compute(), whole.compute())
    with pytest.raises(ValueError, match="values"):
        merged.load_totals(totals[:-1])


def test_runs_from_every_start_and_capped_mean():
    ok = torch.tensor([[True, True, False, True], [False, True, True, True]])
    assert runs_from_every_start(ok).tolist() == [[2, 1, 0, 1], [0, 3, 2, 1]]
    hist = torch.tensor([1.0, 0.0, 2.0, 1.0])  # runs 0, 2, 2, 3
    assert capped_mean(hist, 2) == pytest.approx((0 + 2 + 2 + 2) / 4)
    assert math.isnan(capped_mean(torch.zeros(3), 1))


def test_half_precision_inputs_and_bad_shapes():
    pred, target, mask, weight, tokens = random_batch(6)
    acc = AcceptanceAccumulator(lm_head=weight.half())
    acc.update(pred.nan_to_num().half(), target.half(), mask, tokens)
    assert 0 <= acc.compute()["token_top1"] <= 1
    with pytest.raises(ValueError, match="mask"):
        acc.update(pred, target, mask[:, :-1])
    with pytest.raises(ValueError, match="predicts"):
        AcceptanceAccumulator(predicts="later")


def test_strict_json_replaces_nan_and_inf():
    assert strict_json({"a": [1.0, math.nan], "b": (math.inf, "x"), "c": 2}) == {"a": [1.0, None], "b": [None, "x"],
                                                                                "c": 2}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    pred, target, mask, weight, tokens = random_batch(7, shift=1)
    results = []
    for device in ("cpu", "cuda"):
        acc = AcceptanceAccumulator(predicts="next", lm_head=weight, lm_head_batch=5)
        acc.update(pred.to(device), target.to(device), mask.to(device), tokens.to(device))
        results.append(acc.compute())
    for key, value in results[0].items():  # float32 kernels differ in the last bits between devices
        assert results[1][key] == pytest.approx(value, abs=1e-5, nan_ok=True), key


# ----------------------------------------------------------------------------- drafting roll-outs


def brute_rollout(drafts, conf, tokens, mask, gamma, max_new):
    """RolloutAccumulator's figures with explicit loops: every start, the engine's live schedule, and
    the on-path calibration counts."""
    b = drafts.shape[1]
    starts = accepted = 0
    tries, hits = [0] * gamma, [0] * gamma
    live = {"its": 0, "acc": 0, "drafted": 0, "tries": [0] * gamma, "hits": [0] * gamma}
    cal_n, cal_hit = [0] * 20, [0] * 20
    for i in range(b):
        n_i = int(mask[i].sum())

        def run(s, k, n_i=n_i, i=i):
            n = 0
            while n < k and s + n + 1 < n_i and int(drafts[n, i, s]) == int(tokens[i, s + n + 1]):
                n += 1
            return n

        for s in range(n_i - 1):
            starts += 1
            n = run(s, gamma)
            accepted += n
            for k in range(gamma):
                if s + k + 1 < n_i:
                    tries[k] += 1
                    hits[k] += k < n
                    if k <= n:  # drafts before this one all accepted: on the path
                        c = min(int(float(conf[k, i, s]) * 20), 19)
                        cal_n[c] += 1
                        cal_hit[c] += k < n
        verified = 1
        while n_i and verified < n_i:
            k = max(0, min(gamma, max_new - verified - 1))
            n = run(verified - 1, k)
            live["its"] += 1
            live["acc"] += n
            live["drafted"] += k
            for j in range(k):
                live["tries"][j] += 1
                live["hits"][j] += j < n
            verified += n + 1
    return starts, accepted, tries, hits, live, cal_n, cal_hit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollout_accumulator_matches_brute_force(seed):
    from metrics import RolloutAccumulator

    g = torch.Generator().manual_seed(seed)
    b, t, gamma, v = 6, 12, 4, 3  # a small vocabulary, so drafts often hit
    tokens = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = 0, t
    mask = torch.arange(t)[None] < lengths[:, None]
    drafts = torch.randint(0, v, (gamma + 1, b, t), generator=g)
    conf = torch.rand(gamma + 1, b, t, generator=g)
    max_new = t if seed else 7  # seed 0: the cap cuts the live schedule short, as max_new_tokens does
    acc = RolloutAccumulator(gamma, max_new_tokens=max_new)
    acc.update(drafts[:, :3], conf[:, :3], tokens[:3], mask[:3])  # two batches add up
    acc.update(drafts[:, 3:], conf[:, 3:], tokens[3:], mask[3:])
    m = acc.compute()
    starts, accepted, tries, hits, live, cal_n, cal_hit = brute_rollout(drafts, conf, tokens, mask, gamma, max_new)
    assert m["accept_len"] == pytest.approx(accepted / starts)
    assert m["per_position"] == pytest.approx([h / n if n else math.nan for h, n in zip(hits, tries, strict=True)],
                                              nan_ok=True)
    assert m["live_iterations"] == live["its"]
    assert m["live_accepted_per_iteration"] == pytest.approx(live["acc"] / live["its"])
    assert m["live_tokens_per_verify"] == pytest.approx((live["acc"] + live["its"]) / live["its"])
    assert m["live_drafted_per_iteration"] == pytest.approx(live["drafted"] / live["its"])
    assert m["live_per_position"] == pytest.approx(
        [h / n if n else math.nan for h, n in zip(live["hits"], live["tries"], strict=True)], nan_ok=True)
    cal = acc.calibration()
    assert cal["count"] == cal_n and cal["rate"] == pytest.approx(
        [h / n if n else math.nan for h, n in zip(cal_hit, cal_n, strict=True)], nan_ok=True)
    assert all(a <= b_ for a, b_ in zip(cal["accept"], cal["accept"][1:], strict=False))  # monotone
    merged = RolloutAccumulator(gamma, max_new_tokens=max_new)
    merged.load_totals(acc.totals())
    assert strict_json(merged.compute()) == strict_json(m)


def test_rollout_accumulator_hand_made_answer():
    """One answer of 5 tokens [7 8 9 7 2]: drafts from start 0 hit, hit, miss; the engine's schedule
    verifies token 0 (prefill), accepts 2 drafts + its own token, then drafts from start 3."""
    from metrics import RolloutAccumulator

    tokens = torch.tensor([[7, 8, 9, 7, 2]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    drafts = torch.full((3, 1, 5), 0)
    drafts[:, 0, 0] = torch.tensor([8, 9, 1])  # start 0: positions 1, 2 right, 3 wrong
    drafts[:, 0, 3] = torch.tensor([2, 5, 5])  # start 3: position 4 (EOS) right; nothing to check after it
    acc = RolloutAccumulator(3, max_new_tokens=50)
    acc.update(drafts, torch.full((3, 1, 5), 0.99), tokens, mask)
    m = acc.compute()
    assert m["live_iterations"] == 2 and m["live_accepted_per_iteration"] == pytest.approx(1.5)
    assert m["live_drafted_per_iteration"] == pytest.approx(3.0)  # the engine drafts past the answer's end too
    assert m["accept_len"] == pytest.approx((2 + 0 + 0 + 1) / 4)
    capped = RolloutAccumulator(3, max_new_tokens=5)  # answers capped at 5 tokens: no room for drafts at the end
    capped.update(drafts, torch.full((3, 1, 5), 0.99), tokens, mask)
    assert capped.compute()["live_accepted_per_iteration"] == pytest.approx(1.0)


def test_isotonic_pools_violators_and_fills_gaps():
    from metrics import isotonic

    assert isotonic([0.1, 0.5, 0.3, 0.9], [1, 1, 1, 1]) == pytest.approx([0.1, 0.4, 0.4, 0.9])
    assert isotonic([math.nan, 0.2, 0.6, math.nan], [0, 2, 1, 0]) == pytest.approx([0.2, 0.2, 0.6, 0.6])
    assert isotonic([0.8, 0.2], [3, 1]) == pytest.approx([0.65, 0.65])


def test_draft_tokens_gives_argmax_and_its_probability():
    from metrics import draft_tokens

    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    out = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, False]])
    tok, conf = draft_tokens([out], head, valid, rows_at_a_time=1)
    assert tok[0].tolist() == [[0, 1, -1]]
    assert conf[0, 0, 0] == pytest.approx(float(torch.softmax(torch.tensor([2.0, 0.0, -2.0]), 0)[0]))
    assert conf[0, 0, 2] == 0


def test_rollout_accumulator_takes_windows_shorter_than_gamma():
    from metrics import RolloutAccumulator

    acc = RolloutAccumulator(5)
    tokens = torch.tensor([[3, 4, 5]])
    drafts = torch.tensor([[[4, 5, 0]], [[5, 0, 0]], [[0, 0, 0]], [[0, 0, 0]], [[0, 0, 0]]])
    acc.update(drafts, torch.ones(5, 1, 3), tokens, torch.ones(1, 3, dtype=torch.bool))
    m = acc.compute()
    assert m["live_iterations"] == 1 and m["live_accepted_per_iteration"] == 1.0  # k = min(5, 3 - 1 - 1) = 1
    assert m["accept_len"] == pytest.approx((2 + 1) / 2)  # starts 0 (two hits) and 1 (one)


def test_per_position_means_ignore_nan_in_the_padding():
    """Padding holds NaN (random_batch): every per-position mean with a count is a number (issue 18)."""
    for predicts in ("same", "next"):
        pred, target, mask, weight, tokens = random_batch(5)
        acc = AcceptanceAccumulator(predicts=predicts, lm_head=weight, max_positions=pred.shape[1])
        acc.update(pred, target, mask, tokens)
        per = acc.per_position()
        for key, values in per.items():
            if key in ("position", "count"):
                continue
            counted = [v for v, n in zip(values, per["count"], strict=True) if n > 0]
            assert counted and not any(math.isnan(v) for v in counted), (predicts, key, values)
