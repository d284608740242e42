"""Adapter zoo: parameter counts, shapes, initial behaviour, causality, padding, checkpoints, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common import UserError
from hidden_adapter import (
    ADAPTER_NAMES,
    canonical_name,
    count_parameters,
    create_adapter,
    load_adapter,
    save_adapter,
    summary_rows,
)
from losses import adapter_loss, alignment_loss, masked_cosine_loss, masked_mse

D = 32  # toy width: divisible by 8 heads


def make(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    adapter = create_adapter(name, D, dropout=0.0, **kw)
    return adapter.eval()


def randomize(adapter: torch.nn.Module) -> None:
    """Move away from the (partly zero) initialisation so behaviour tests are not trivially true."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def call(adapter, x, mask=None, h_target=None):
    """Call any level: L5F gets h_target, L5E a context vector (here the first position of x, a stand-in
    for EventGPT's prompt-end state)."""
    context = x[:, 0] if adapter.config.context == "drafter" else None
    return adapter(x, mask, h_target=h_target if adapter.consumes == "both" else None, context=context)


# ----------------------------------------------------------------------------- parameter counts


def test_parameter_counts_at_4096_match_spec():
    counts = {r["level"]: r["params"] for r in summary_rows(4096)}
    assert counts["L1"] == 2_113_537
    assert counts["L2"] == 6_324_227
    for name, spec in (("L3", 16.8e6), ("L4", 101e6), ("L5", 103e6), ("L5F", 170e6)):
        assert abs(counts[name] - spec) / spec < 0.01, (name, counts[name])
    assert counts["B1"] == counts["L5"]


def test_optional_token_fusion_adds_spec_sized_modules():
    with torch.device("meta"):
        plain = count_parameters(create_adapter("L5"))
        fused = count_parameters(create_adapter("L5", use_token_embed=True))
    assert fused - plain == 131_072_000 + 33_558_528


def test_summary_reports_inputs_and_outputs():
    rows = {r["level"]: r for r in summary_rows(64)}
    assert rows["L1"]["consumes"] == "drafter" and rows["L1"]["predicts"] == "same"
    assert rows["L4"]["attention"] == "bidirectional"
    assert rows["B1"]["consumes"] == "target" and rows["B1"]["predicts"] == "next"
    assert rows["L5F"]["consumes"] == "both" and rows["L5F"]["attention"] == "causal"


# ----------------------------------------------------------------------------- factory


@pytest.mark.parametrize(
    "level,name",
    [(1, "L1"), ("2", "L2"), ("l3", "L3"), (4, "L4"), ("L5", "L5"), ("b1", "B1"), (6, "L5F"), ("l5f", "L5F"),
     (7, "L5E"), ("l5e", "L5E")],
)
def test_factory_accepts_levels_and_names(level, name):
    assert create_adapter(level, D).config.name == name


@pytest.mark.parametrize("bad", ["L7", 0, 8, "foo", "", None, True, 2.0])
def test_factory_rejects_unknown_levels_and_lists_valid_names(bad):
    with pytest.raises(ValueError, match="L1, L2, L3, L4, L5, B1, L5F, L5E"):
        create_adapter(bad)


def test_factory_rejects_unknown_option_and_bad_vlm_only():
    with pytest.raises(ValueError, match="unknown adapter option"):
        create_adapter("L1", D, bottleneck=3)
    with pytest.raises(ValueError, match="vlm_only"):
        create_adapter("L2", D, vlm_only=True)
    assert canonical_name(5, vlm_only=True) == "B1"


# ----------------------------------------------------------------------------- shapes and widths


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_shapes_with_different_drafter_and_target_widths(name):
    adapter = create_adapter(name, drafter_dim=24, target_dim=D).eval()
    b, t = 2, 7
    x = torch.randn(b, t, D if adapter.consumes == "target" else 24)
    ctx = torch.randn(b, 24) if adapter.config.context else None
    v = torch.randn(b, t, D) if adapter.consumes == "both" else None
    out = adapter(x, torch.ones(b, t, dtype=torch.bool), h_target=v, context=ctx)
    assert out.shape == (b, t, D)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_wrong_width_is_a_clear_error(name):
    adapter = make(name)
    with pytest.raises(ValueError, match="another model width"):
        call(adapter, torch.randn(1, 3, D + 8), h_target=torch.randn(1, 3, D))


@pytest.mark.parametrize("name", [n for n in ADAPTER_NAMES if n != "L5F"])
def test_an_input_the_level_does_not_read_is_refused_naming_what_it_reads(name):
    """`B1(h, mask, h_target=...)` used to run B1 on `h` and drop h_target without a word."""
    adapter = make(name)
    x = torch.randn(1, 3, D)
    with pytest.raises(ValueError, match=rf"{name} does not read h_target; it reads x = .*states \[B, T, {D}\]"):
        adapter(x, h_target=torch.randn(1, 3, D))
    if not adapter.config.uses_tokens:
        with pytest.raises(ValueError, match=f"{name} does not read token_ids"):
            adapter(x, token_ids=torch.zeros(1, 3, dtype=torch.long))
    if not adapter.config.context:
        with pytest.raises(ValueError, match=f"{name} does not read context"):
            adapter(x, context=torch.randn(1, D))


def test_what_each_level_reads_is_said_in_words():
    assert "Video-LLaVA's (the target's) states" in make("B1").reads()
    assert "EventGPT's (the drafter's) states" in make("L5").reads()
    assert "h_target = Video-LLaVA's states" in make("L5F").reads()
    assert "context = EventGPT's prompt-end state" in make("L5E").reads()
    assert "token_ids" in make("B1", token_input=True).reads()


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_fp16_inputs_are_cast_to_the_adapters_dtype(name):
    """Stored chunks are fp16; an fp32 adapter casts them (torch would raise its raw dtype error), and the result
    equals the call on the same values in fp32."""
    adapter = make(name)
    randomize(adapter)
    x, v = torch.randn(2, 4, D).half(), torch.randn(2, 4, D).half()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 0/1 integers are taken as a bool mask
    out = call(adapter, x, mask, h_target=v)
    assert out.dtype == torch.float32
    assert torch.allclose(out, call(adapter, x.float(), mask.bool(), h_target=v.float()))
    if adapter.predicts == "next":
        kw = {"h_target": v} if adapter.consumes == "both" else {}
        kw |= {"context": x[:, 0]} if adapter.config.context else {}
        assert adapter.rollout(x, mask, 2, **kw)[1].dtype == torch.float32


def test_inputs_that_cannot_be_cast_are_refused_in_one_line():
    adapter = make("B1", token_input=True)
    with pytest.raises(ValueError, match=r"floating-point hidden states, got torch\.int64"):
        adapter(torch.zeros(1, 3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids must be integer token ids"):
        adapter(torch.randn(1, 3, D), token_ids=torch.zeros(1, 3))
    meta = torch.randn(1, 3, D, device="meta")
    with pytest.raises(ValueError, match=r"x is on meta but the adapter is on cpu; move the inputs with \.to\('cpu'\)"):
        adapter(meta, token_ids=torch.zeros(1, 3, dtype=torch.long))


def test_l5f_requires_target_states():
    with pytest.raises(ValueError, match="h_target"):
        make("L5F")(torch.randn(1, 3, D))


def test_positions_beyond_learned_range_are_rejected():
    adapter = create_adapter("L5", D, max_seq_len=8).eval()
    with pytest.raises(ValueError, match="max_seq_len"):
        adapter(torch.randn(1, 9, D))


# ----------------------------------------------------------------------------- initial behaviour


def test_bottleneck_levels_start_as_their_layer_norms():
    x = torch.randn(2, 5, D) * 3 + 1
    for name in ("L1", "L2"):
        assert torch.allclose(make(name)(x), F.layer_norm(x, (D,)), atol=1e-5)
    # L3: input LayerNorm then identity blocks then final LayerNorm.
    assert torch.allclose(make("L3")(x), F.layer_norm(F.layer_norm(x, (D,)), (D,)), atol=1e-5)


def test_initial_alphas_and_projections():
    l1 = make("L1")
    assert l1.blocks[0].alpha.item() == pytest.approx(0.1)
    assert torch.count_nonzero(l1.blocks[0].up_proj.weight) == 0
    assert len(make("L2").blocks) == 3 and len(make("L3").blocks) == 2
    l4 = make("L4")
    assert torch.equal(l4.output_proj.weight, torch.eye(D)) and l4.alpha.item() == pytest.approx(0.1)
    assert make("L5").pos_embed.std().item() == pytest.approx(0.02, rel=0.3)


def test_eagle_levels_start_as_identity_of_their_residual():
    x, v = torch.randn(2, 6, D), torch.randn(2, 6, D)
    assert torch.equal(make("L5")(x), x)
    assert torch.equal(make("B1")(v), v)
    assert torch.equal(make("L5F")(x, h_target=v), v)


# ----------------------------------------------------------------------------- causality and padding


@pytest.mark.parametrize("name", ["L5", "B1", "L5F", "L5E"])
def test_causal_levels_ignore_the_future(name):
    adapter = make(name)
    randomize(adapter)
    x, v = torch.randn(2, 10, D), torch.randn(2, 10, D)
    base = call(adapter, x, h_target=v)
    t = 4
    x2, v2 = x.clone(), v.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :]) * 5
    v2[:, t + 1 :] += torch.randn_like(v2[:, t + 1 :]) * 5
    changed = call(adapter, x2, h_target=v2)
    assert torch.allclose(base[:, : t + 1], changed[:, : t + 1], atol=1e-5)
    assert not torch.allclose(base[:, t + 1 :], changed[:, t + 1 :], atol=1e-3)


def test_bidirectional_l4_sees_the_future():
    adapter = make("L4")
    randomize(adapter)
    x = torch.randn(1, 8, D)
    x2 = x.clone()
    x2[:, -1] += 5 * torch.randn(D)  # not a constant: LayerNorm would remove that
    assert not torch.allclose(adapter(x)[:, 0], adapter(x2)[:, 0], atol=1e-4)


@pytest.mark.parametrize("name", ["L4", "L5", "L5F", "L5E"])
def test_padding_never_changes_valid_outputs(name):
    adapter = make(name)
    randomize(adapter)
    x, v = torch.randn(1, 6, D), torch.randn(1, 6, D)
    alone = call(adapter, x, torch.ones(1, 6, dtype=torch.bool), h_target=v)
    pad = 4
    xp = torch.cat([x, 1e3 * torch.randn(1, pad, D)], dim=1)
    vp = torch.cat([v, 1e3 * torch.randn(1, pad, D)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, pad)], dim=1).bool()
    padded = call(adapter, xp, mask, h_target=vp)
    assert torch.allclose(alone, padded[:, :6], atol=1e-5)
    assert torch.isfinite(padded).all()


def test_fully_padded_row_gives_finite_outputs():
    adapter = make("L4")
    out = adapter(torch.randn(2, 5, D), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]).bool())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["L5", "B1", "L5F", "L5E"])
def test_incremental_step_matches_full_forward(name):
    from hidden_adapter import ProjectedContext

    adapter = make(name)
    randomize(adapter)
    x, v = torch.randn(2, 9, D), torch.randn(2, 9, D)
    full = call(adapter, x, h_target=v)
    hv = (lambda s: v[:, s]) if adapter.consumes == "both" else (lambda s: None)
    # L5E's context as drafting passes it: projected once (call() gives it x[:, 0])
    ctx = {"context": ProjectedContext(adapter.context_vector(x[:, 0]))} if adapter.config.context else {}
    out, past = adapter.step(x[:, :5], h_target=hv(slice(0, 5)), **ctx)
    outs = [out]
    for t in range(5, 9):
        o, past = adapter.step(x[:, t : t + 1], past, h_target=hv(slice(t, t + 1)), **ctx)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, dim=1), full, atol=1e-5)


def test_token_fusion_uses_token_ids():
    adapter = create_adapter("L5", D, use_token_embed=True, vocab_size=50, dropout=0.0).eval()
    randomize(adapter)
    x = torch.randn(1, 4, D)
    a = adapter(x, token_ids=torch.tensor([[1, 2, 3, 4]]))
    b = adapter(x, token_ids=torch.tensor([[1, 2, 3, 5]]))
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, 3], b[:, 3])
    with pytest.raises(ValueError, match="token_ids"):
        adapter(x)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_save_load_round_trip_is_exact(tmp_path, name):
    adapter = make(name)
    randomize(adapter)
    path = tmp_path / f"{name}.pt"
    save_adapter(path, adapter, args={"lr": 1e-3, "out": tmp_path}, epoch=3)
    loaded, extra = load_adapter(path, expected_level=name, drafter_dim=D, target_dim=D)
    assert extra["epoch"] == 3 and extra["args"]["out"] == str(tmp_path)
    x, v = torch.randn(2, 5, D), torch.randn(2, 5, D)
    assert torch.equal(call(adapter, x, h_target=v), call(loaded, x, h_target=v))
    assert not loaded.training


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    save_adapter(path, make("L1"))
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["name"] == "L1" and payload["format"] == "xmodal_sd.adapter"


def test_checkpoint_errors_are_one_clear_line(tmp_path):
    good = tmp_path / "l2.pt"
    save_adapter(good, make("L2"))
    with pytest.raises(UserError, match="is a L2 adapter but L5F was expected"):
        load_adapter(good, expected_level="L5F")
    with pytest.raises(UserError, match="target width 32 but the data/model has width 4096"):
        load_adapter(good, target_dim=4096)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match=r"cannot read adapter checkpoint .*trunc\.pt"):
        load_adapter(truncated)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not an adapter checkpoint"):
        load_adapter(other)
    with pytest.raises(UserError, match="not found"):
        load_adapter(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="plain types"):
        save_adapter(tmp_path / "x.pt", make("L1"), bad=object())


# ----------------------------------------------------------------------------- losses


def test_losses_ignore_padding_even_nan():
    pred, target = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    ref = alignment_loss(pred, target, mask)
    pred2 = pred.clone()
    pred2[0, 4:] = float("nan")
    target2 = target.clone()
    target2[0, 4:] = 1e6
    assert torch.equal(alignment_loss(pred2, target2, mask), ref)
    valid = mask.reshape(-1)
    p, t = pred.reshape(-1, D)[valid], target.reshape(-1, D)[valid]
    expected = ((p - t) ** 2).mean() + 0.5 * (1 - F.cosine_similarity(p, t, dim=-1)).mean()
    assert torch.allclose(ref, expected, atol=1e-6)


def test_losses_are_zero_for_perfect_prediction_and_empty_masks():
    x = torch.randn(2, 4, D)
    assert masked_mse(x, x, None) == 0
    assert masked_cosine_loss(x, x, None).abs() < 1e-6
    assert alignment_loss(x, torch.randn_like(x), torch.zeros(2, 4, dtype=torch.bool)) == 0
    adapter = make("L5")
    loss, _ = adapter_loss(adapter, adapter(x), x, torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()  # an all-padding batch must not break the training loop
    assert loss == 0


def test_eagle_loss_adds_weighted_next_position_term():
    pred, target = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    same, parts = adapter_loss(make("L2"), pred, target, mask)
    assert set(parts) == {"align"} and torch.allclose(same, alignment_loss(pred, target, mask))
    eagle, parts = adapter_loss(make("L5"), pred, target, mask)
    shifted_mask = mask[:, :-1] & mask[:, 1:]
    expected = alignment_loss(pred, target, mask) + 0.5 * alignment_loss(pred[:, :-1], target[:, 1:], shifted_mask)
    assert torch.allclose(eagle, expected, atol=1e-6) and set(parts) == {"align", "pred"}
    # output[t] == target[t+1] makes the prediction term vanish.
    ahead = torch.cat([target[:, 1:], target[:, -1:]], dim=1)
    _, parts = adapter_loss(make("B1"), ahead, target, mask)
    assert parts["pred"] < 1e-6


def test_inner_widths_follow_the_reference_ratios():
    with torch.device("meta"):
        wide = {n: create_adapter(n).config for n in ("L1", "L3", "L4")}
        toy = {n: create_adapter(n, 64).config for n in ("L1", "L3", "L4")}
        custom = create_adapter("L1", 64, bottleneck_dim=256).config
    assert (wide["L1"].bottleneck_dim, wide["L3"].bottleneck_dim, wide["L4"].ffn_dim) == (256, 1024, 2048)
    assert (toy["L1"].bottleneck_dim, toy["L3"].bottleneck_dim, toy["L4"].ffn_dim) == (4, 16, 32)
    assert custom.bottleneck_dim == 256


# ----------------------------------------------------------------------------- hardening (issue 7)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_config_built_by_hand_gets_its_levels_architecture(name):
    """AdapterConfig(name=...) alone must give the same network as create_adapter (L2 = 3 blocks,
    L3 = blocks 1/4 of the width), not the dataclass's generic defaults."""
    from hidden_adapter import AdapterConfig, build_adapter

    by_hand = AdapterConfig(name=name.lower(), drafter_dim=64, target_dim=64)
    assert by_hand == create_adapter(name, 64).config
    assert by_hand.name == name
    assert count_parameters(build_adapter(by_hand)) == count_parameters(create_adapter(name, 64))
    if name == "L2":
        assert by_hand.num_blocks == 3 and by_hand.bottleneck_dim == 4
    if name == "L3":
        assert by_hand.num_blocks == 2 and by_hand.bottleneck_dim == 16


def test_explicit_values_of_older_checkpoints_are_kept(tmp_path):
    from dataclasses import asdict

    adapter = create_adapter("L2", D, num_blocks=2, bottleneck_dim=8)
    path = tmp_path / "old.pt"
    save_adapter(path, adapter)
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["num_blocks"] == 2  # stored explicitly, as every checkpoint so far
    loaded, _ = load_adapter(path)
    assert asdict(loaded.config) == asdict(adapter.config) and len(loaded.blocks) == 2


@pytest.mark.parametrize("name", ["L4", "L5", "B1", "L5F", "L5E"])
def test_nan_in_padded_inputs_keeps_attention_levels_finite(name):
    adapter = make(name)
    randomize(adapter)
    x, v = torch.randn(2, 6, D), torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    clean = call(adapter, x, mask, h_target=v)
    x_nan, v_nan = x.clone(), v.clone()
    x_nan[0, 4:] = float("nan")
    v_nan[0, 4:] = float("inf")
    out = call(adapter, x_nan, mask, h_target=v_nan)
    assert torch.equal(out[mask], clean[mask])
    loss, _ = adapter_loss(adapter, out, v, mask)
    assert torch.isfinite(loss)


def test_training_learns_a_mapping_only_the_bottleneck_can_express():
    """Target = LN(x + rank-2 linear map of x): the final LayerNorm alone (what L1 is with its block
    replaced by the identity) cannot fit it; L1 must get far below that."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, D)
    u, w = torch.randn(D, 2), torch.randn(2, D)
    target = F.layer_norm(x + 2 * (x @ u) @ w / D**0.5, (D,))

    def fit(module: torch.nn.Module) -> float:
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        for _ in range(300):
            loss = alignment_loss(module(x), target, None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    norm_only = fit(torch.nn.LayerNorm(D))
    l1 = fit(create_adapter("L1", D, dropout=0.0))
    assert l1 < 0.3 * norm_only, (l1, norm_only)


def test_masked_losses_on_hand_made_cases():
    """Values worked out by hand, not with the code's own expression."""
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [float("nan"), 5.0]]])
    target = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    # squared errors: position 0: 0 + 0; position 1: 4 + 4 -> mean over 2 positions x 2 dims = 8 / 4 = 2
    assert masked_mse(pred, target, mask).item() == pytest.approx(2.0)
    # cosines: 1 and 0 -> mean(1 - cos) = 0.5
    assert masked_cosine_loss(pred, target, mask).item() == pytest.approx(0.5)
    assert alignment_loss(pred, target, mask).item() == pytest.approx(2.25)
    # next-position term pairs output 0 with target 1 only (output 1 has no valid successor):
    # squared error (1-2)^2 + 0 = 1 -> MSE 0.5; cos([1,0],[2,0]) = 1 -> 0; term = 0.5
    config = make("L5").config
    _, parts = adapter_loss(config, pred, target, mask)
    assert parts["pred"] == pytest.approx(0.5) and parts["align"] == pytest.approx(2.25)
    s, _ = adapter_loss(config, pred, target, mask, mix="sum", prediction_weight=0.5)
    c, _ = adapter_loss(config, pred, target, mask, mix="convex", prediction_weight=0.5)
    assert s.item() == pytest.approx(2.25 + 0.25) and c.item() == pytest.approx(1.125 + 0.25)
    only_pred, _ = adapter_loss(config, pred, target, mask, mix="convex", prediction_weight=1.0)
    assert only_pred.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sum, convex"):
        adapter_loss(config, pred, target, mask, mix="other")


def test_run_and_encode_take_arguments_in_one_order():
    import inspect

    from hidden_adapter import AttentionAdapter, EAGLEStyleAdapter, FusedEAGLEAdapter

    run = list(inspect.signature(AttentionAdapter._run).parameters)[1:5]
    for cls in (AttentionAdapter, EAGLEStyleAdapter, FusedEAGLEAdapter):
        assert list(inspect.signature(cls._encode).parameters)[1:5] == run == ["x", "mask", "h_target", "token_ids"]


@pytest.mark.parametrize("name", ADAPTER_NAMES)
def test_hf_export_reloads_to_identical_outputs(tmp_path, name):
    from adapter_hub import export_hf, load_hf

    adapter = make(name)
    randomize(adapter)
    export_hf(adapter, tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    loaded = load_hf(tmp_path / "hf")
    x, v = torch.randn(2, 5, D), torch.randn(2, 5, D)
    assert loaded.config == adapter.config and not loaded.training
    assert torch.equal(call(adapter, x, h_target=v), call(loaded, x, h_target=v))
    with pytest.raises(UserError, match="cannot load an exported adapter"):
        load_hf(tmp_path / "nothing")


# ----------------------------------------------------------------------------- token input, L5E, roll-outs


def test_token_input_adds_only_the_fusion_and_keeps_the_table_out_of_the_checkpoint(tmp_path):
    with torch.device("meta"):
        plain = count_parameters(create_adapter("B1"))
        frozen = create_adapter("B1", token_input=True)
    # the specification's fusion Linear(8192 -> 4096) plus a LayerNorm on the embedding; no 32000 x 4096 table
    assert count_parameters(frozen) - plain == 33_558_528 + 8_192
    adapter = make("B1", token_input=True, vocab_size=11)
    with pytest.raises(ValueError, match="attach_token_table"):
        adapter(torch.randn(1, 3, D), token_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="11-token vocabulary"):
        adapter.attach_token_table(torch.randn(12, D))
    with pytest.raises(ValueError, match=r"\[V, 32\]"):
        adapter.attach_token_table(torch.randn(11, D + 1))
    adapter.attach_token_table(torch.randn(11, D))
    assert "token_table" not in adapter.state_dict()
    save_adapter(tmp_path / "t.pt", adapter)
    loaded, _ = load_adapter(tmp_path / "t.pt")
    assert loaded.config.token_input and loaded.token_table is None
    with pytest.raises(ValueError, match="next-position levels"):
        create_adapter("L2", D, token_input=True)
    with pytest.raises(ValueError, match="choose one"):
        create_adapter("B1", D, token_input=True, use_token_embed=True)


def test_token_input_reads_the_tokens_of_each_position():
    adapter = make("B1", token_input=True, vocab_size=11)
    randomize(adapter)
    adapter.attach_token_table(torch.randn(11, D))
    x = torch.randn(1, 4, D)
    ids = torch.tensor([[1, 2, 3, 4]])
    other = torch.tensor([[1, 2, 3, 5]])  # only the last token differs: causal, so only the last output moves
    a, b = adapter(x, token_ids=ids), adapter(x, token_ids=other)
    assert torch.allclose(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 3], b[:, 3])


def test_l5e_starts_as_b1_and_reads_its_context():
    b1, l5e = make("B1"), make("L5E")
    randomize(b1)
    shared = {k: v for k, v in b1.state_dict().items()}
    missing = l5e.load_state_dict(shared, strict=False).missing_keys
    assert sorted(missing) == ["context_norm.bias", "context_norm.weight", "context_proj.bias", "context_proj.weight"]
    x, g = torch.randn(2, 5, D), torch.randn(2, D)
    assert torch.allclose(l5e(x, context=g), b1(x), atol=1e-6)  # zero-initialised context projection
    randomize(l5e)
    assert not torch.allclose(l5e(x, context=g), l5e(x, context=torch.randn(2, D)))
    with pytest.raises(ValueError, match="context"):
        l5e(x)
    assert l5e.consumes == "target" and l5e.predicts == "next" and l5e.config.context == "drafter"


ROLLOUT_CASES = [(lv, tok) for lv in ("B1", "L5", "L5F", "L5E") for tok in (False, True)]


@pytest.mark.parametrize("level,tokens", ROLLOUT_CASES, ids=[f"{lv}{'+tok' if t else ''}" for lv, t in ROLLOUT_CASES])
def test_rollout_equals_drafting_step_by_step(level, tokens):
    """outs[k-1][:, t] of one batched roll-out equals what drafting computes after verifying 0..t: the
    true inputs through `step`, then k-1 steps each fed the adapter's own previous output (L5F: the
    drafter state of the next position and its own output as the target state)."""
    torch.manual_seed(0)
    v_size, t_len, steps = 17, 9, 4
    adapter = create_adapter(level, D, dropout=0.0, token_input=tokens, vocab_size=v_size, num_layers=2)
    randomize(adapter)
    if tokens:
        adapter.attach_token_table(torch.randn(v_size, D))
    adapter.eval()
    x, s = torch.randn(2, t_len, D), torch.randn(2, t_len, D)
    ids, g0 = torch.randint(0, v_size, (2, t_len)), torch.randn(2, D)
    mask = torch.ones(2, t_len, dtype=torch.bool)
    mask[1, 6:] = False
    inp = s if adapter.consumes == "target" else x
    kw = {"h_target": s} if level == "L5F" else {}
    kw |= {"context": g0} if level == "L5E" else {}
    kw |= {"token_ids": ids} if tokens else {}
    with torch.no_grad():
        outs = adapter.rollout(inp, mask, steps, **kw)
        assert torch.allclose(outs[0][mask], adapter(inp, mask, **kw)[mask], atol=1e-5)
        for t in range(t_len - steps + 1):
            ctx = {k: v[:1, : t + 1] if k in ("h_target", "token_ids") else v[:1] for k, v in kw.items()}
            out, past = adapter.step(inp[:1, : t + 1], None, **ctx)
            h = out[:, -1:]
            for k in range(1, steps):
                assert torch.allclose(h[0, 0], outs[k - 1][0, t], atol=1e-4), (t, k)
                nxt = {"h_target": h} if level == "L5F" else {}
                nxt |= {"context": g0[:1]} if level == "L5E" else {}
                nxt |= {"token_ids": ids[:1, t + k : t + k + 1]} if tokens else {}
                h, past = adapter.step(x[:1, t + k : t + k + 1] if level == "L5F" else h, past, **nxt)
            assert torch.allclose(h[0, 0], outs[steps - 1][0, t], atol=1e-4)
    adapter.train()  # and with gradients, as training runs it
    assert all(o.requires_grad for o in adapter.rollout(inp, mask, 2, **kw))


def test_drafting_loss_one_step_is_the_one_step_loss_and_adds_later_steps_and_tokens():
    from losses import drafting_loss, step_weights

    adapter = make("B1")
    torch.manual_seed(3)
    t = torch.randn(2, 6, D)
    outs = [torch.randn(2, 6, D) for _ in range(3)]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    one, _ = drafting_loss(adapter, outs[:1], t, mask, mix="convex", prediction_weight=1.0)
    ref, _ = adapter_loss(adapter, outs[0], t, mask, mix="convex", prediction_weight=1.0)
    assert torch.allclose(one, ref)
    w = step_weights(3, 0.5)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    three, parts = drafting_loss(adapter, outs, t, mask, decay=0.5, mix="convex", prediction_weight=1.0)
    pair2 = mask[:, :4] & mask[:, 2:]
    pair3 = mask[:, :3] & mask[:, 3:]
    by_hand = (w[0] * ref + w[1] * alignment_loss(outs[1][:, :4], t[:, 2:], pair2)
               + w[2] * alignment_loss(outs[2][:, :3], t[:, 3:], pair3))
    assert torch.allclose(three, by_hand) and set(parts) >= {"pred", "step2", "step3"}
    head, tokens = torch.randn(7, D), torch.randint(0, 7, (2, 6))
    with_ce, parts = drafting_loss(adapter, outs, t, mask, tokens=tokens, lm_head=head, decay=0.5,
                                   token_loss_weight=0.1, mix="convex", prediction_weight=1.0)
    ce = sum(wk * F.cross_entropy(o[:, : 6 - k][p] @ head.T, tokens[:, k:][p])
             for k, (o, wk, p) in enumerate(zip(outs, w, [mask[:, :5] & mask[:, 1:], pair2, pair3], strict=True),
                                            start=1))
    assert torch.allclose(with_ce, by_hand + 0.1 * ce)
    with pytest.raises(ValueError, match="LM head"):
        drafting_loss(adapter, outs, t, mask, token_loss_weight=0.1)


def test_rollout_of_l5_needs_equal_widths_and_short_windows_work():
    from hidden_adapter import AdapterConfig, rollout_problem

    assert "B1, L5E or L5F" in rollout_problem(AdapterConfig("L5", drafter_dim=24, target_dim=D))
    assert rollout_problem(AdapterConfig("L5", drafter_dim=D, target_dim=D)) is None
    assert rollout_problem(AdapterConfig("L5F", drafter_dim=24, target_dim=D)) is None
    assert "same-position" in rollout_problem(AdapterConfig("L2", target_dim=D))
    with pytest.raises(ValueError, match="rolls out on its own outputs"):
        create_adapter("L5", drafter_dim=24, target_dim=D).rollout(torch.randn(1, 4, 24), None, 2)
    # a window shorter than the roll-out: later steps have nothing to read but still come back [B, T, D]
    outs = make("B1").rollout(torch.randn(2, 3, D), None, 5)
    assert len(outs) == 5 and all(o.shape == (2, 3, D) for o in outs)
