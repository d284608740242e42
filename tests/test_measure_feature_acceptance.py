"""measure_feature_acceptance.py on hand-made chunks (values checked against a direct loop, mask rule
per pairing, refusals) and, as a subprocess, on the quick toy world's extracted test split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import measure_feature_acceptance as mfa
from adapter_checkpoint import save_adapter
from common import UserError, atomic_torch_save, atomic_write_json
from hidden_adapter import create_adapter
from hidden_data import FORMAT_VERSION, MANIFEST_FORMAT, differing_models, model_hashes, write_chunk
from tests.conftest import ROOT

D, T, V = 16, 6, 20
MODELS = {"drafter": {"config_hash": "egpt-hash"}, "target": {"config_hash": "vl-hash"}}


def write_test_data(folder, n: int = 6, seed: int = 0, chunk_size: int = 4):
    """Hand-made chunks + manifest: target tokens are the target states' argmax, drafter states are
    noisy copies, masks right-padded with different lengths per model (one sample without positions)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g)
    vl = torch.randn(n, T, D, generator=g)
    vl_len = torch.tensor([6, 5, 3, 0, 6, 2])[:n]
    egpt_len = torch.tensor([4, 5, 6, 2, 6, 1])[:n]
    vl_mask = torch.arange(T)[None] < vl_len[:, None]
    egpt_mask = torch.arange(T)[None] < egpt_len[:, None]
    tensors = {
        "egpt_hidden": (vl + 0.5 * torch.randn(n, T, D, generator=g)).half(),
        "egpt_hidden_tf": (vl + 0.3 * torch.randn(n, T, D, generator=g)).half(),
        "vl_hidden": vl.half(),
        "egpt_tokens": torch.randint(0, V, (n, T), generator=g).int(),
        "vl_tokens": (vl.half().float() @ weight.half().float().T).argmax(-1).int(),
        "egpt_mask": egpt_mask, "vl_mask": vl_mask, "question_idx": torch.zeros(n, dtype=torch.int32),
    }
    folder.mkdir(parents=True)
    chunks = []
    for i, start in enumerate(range(0, n, chunk_size)):
        sl = slice(start, start + chunk_size)
        ids = [f"seq/c{j}#q0" for j in range(start, min(n, start + chunk_size))]
        chunks.append(write_chunk(folder / f"chunk_s000_{i:05d}.pt", {k: v[sl] for k, v in tensors.items()},
                                  ids, [s.split("#")[0] for s in ids]))
    manifest = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "complete": True, "teacher_forced": True,
                "chunks": chunks, "num_samples": n, "models": MODELS, "widths": {"drafter": D, "target": D},
                "max_new_tokens": T}
    atomic_write_json(manifest, folder / "manifest.json")
    head = folder.parent / "lm_head.pt"
    embed = torch.randn(V, D, generator=g) * 0.1  # the target's input embeddings (token-input adapters read them)
    atomic_torch_save({"format": "xmodal_sd.lm_head", "weight": weight.half(), "embed_weight": embed.half(),
                       "vocab_size": V, "hidden_dim": D, "model": "hand", "config_hash": "vl-hash"}, head)
    return tensors, weight.half().float(), head


def checkpoint(tmp_path, level: str, pairs: str, data=None):
    torch.manual_seed(1)
    adapter = create_adapter(level, D, dropout=0.0, max_seq_len=16)
    path = tmp_path / f"{level}_{pairs}" / "best_model.pt"
    save_adapter(path, adapter, pairs=pairs, data=data if data is not None else {"models": MODELS})
    return adapter.eval(), path


def direct_token_top1(adapter, tensors, weight, pairs):
    """Same-position top-1 by a plain loop over valid positions, with the mask rule of DATA_FORMAT.md."""
    drafter = tensors["egpt_hidden" if pairs == "free" else "egpt_hidden_tf"].float()
    mask = tensors["vl_mask"] & (tensors["egpt_mask"] if pairs == "free" else True)
    target = tensors["vl_hidden"].float()
    x = target if adapter.consumes == "target" else drafter
    with torch.no_grad():
        out = adapter(x, mask, h_target=target if adapter.consumes == "both" else None)
    hits = total = 0
    for i in range(mask.shape[0]):
        for t in range(T):
            if mask[i, t]:
                total += 1
                hits += int((out[i, t] @ weight.T).argmax() == tensors["vl_tokens"][i, t])
    return hits / total, total


@pytest.mark.parametrize(("level", "pairs"), [("L1", "free"), ("L4", "teacher_forced"), ("L5F", "teacher_forced"),
                                              ("B1", "free")])
def test_metrics_follow_the_pairing_and_match_a_direct_loop(tmp_path, level, pairs):
    tensors, weight, head = write_test_data(tmp_path / "test")
    adapter, ckpt = checkpoint(tmp_path, level, pairs)
    out = tmp_path / "out"
    result = mfa.main(mfa.parse_args(["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"),
                                      "--lm_head", str(head), "--output_dir", str(out), "--batch_size", "4",
                                      "--device", "cpu", "--gamma_prefill", "3", "--gamma_decode", "2"]))
    top1, total = direct_token_top1(adapter, tensors, weight, pairs)
    m = result["metrics"]
    assert result["pairs"] == pairs and result["level"] == level
    assert m["token_positions"] == total
    assert m["token_top1"] == pytest.approx(top1)
    assert result["counts"]["samples"] == 6 and result["counts"]["samples_without_valid_positions"] == 1
    assert len(result["prefill_free_by_window"]) == T
    assert result["prefill_free_by_window"][2] == pytest.approx(m["prefill_free"])
    if adapter.predicts == "next":
        assert {"shifted_top1", "shifted_top5", "accept_len", "tokens_per_iter"} <= set(m)
        assert result["accept_len_by_gamma"][1] == pytest.approx(m["accept_len"])
        assert m["accept_len"] <= 2
        assert "roll-out" in result["offline_assumption"]
        # the drafting figures of one-step drafts equal the accumulator's own every-start figure, and a roll-out's
        # first draft is the one-step draft
        d = result["drafting"]
        assert d["teacher_forced"]["accept_len"] == pytest.approx(m["accept_len"])
        assert d["rollout"]["per_position"][0] == pytest.approx(d["teacher_forced"]["per_position"][0])
        assert d["rollout"]["live_iterations"] > 0 and (out / "draft_positions.png").stat().st_size > 1000
        assert "roll-out: accepted drafts per iteration" in (out / "acceptance_metrics.md").read_text()
    else:
        assert "shifted_top1" not in m and result["accept_len_by_gamma"] is None and result["drafting"] is None
    on_disk = json.loads((out / "acceptance_metrics.json").read_text())
    assert on_disk["metrics"]["token_top1"] == pytest.approx(top1)
    report = (out / "acceptance_metrics.md").read_text()
    assert report.index("Token level") < report.index("Hidden-state level")  # token figures first
    csv_lines = (out / "per_position.csv").read_text().splitlines()
    assert csv_lines[0].startswith("position,count,token_top1") and len(csv_lines) == T + 1
    assert (out / "per_position.png").stat().st_size > 1000


def test_default_pairs_and_output_dir_come_from_the_checkpoint(tmp_path):
    write_test_data(tmp_path / "test")
    _, ckpt = checkpoint(tmp_path, "L2", "teacher_forced")
    result = mfa.main(mfa.parse_args(["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"),
                                      "--lm_head", str(tmp_path / "lm_head.pt"), "--device", "cpu",
                                      "--max_samples", "3"]))
    assert result["pairs"] == "teacher_forced" and result["counts"]["samples"] == 3
    assert (ckpt.parent / "acceptance_teacher_forced" / "acceptance_metrics.json").is_file()


def test_refuses_other_models_and_wrong_head(tmp_path):
    write_test_data(tmp_path / "test")
    bad = {"models": {"drafter": {"config_hash": "other"}, "target": {"config_hash": "vl-hash"}}}
    _, ckpt = checkpoint(tmp_path, "L1", "free", data=bad)
    args = ["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"), "--lm_head", str(tmp_path / "lm_head.pt"),
            "--device", "cpu", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="another drafter model"):
        mfa.main(mfa.parse_args(args))
    mfa.main(mfa.parse_args([*args, "--allow_model_mismatch"]))
    proc = subprocess.run([sys.executable, str(ROOT / "measure_feature_acceptance.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr
    head = torch.load(tmp_path / "lm_head.pt", weights_only=True)
    atomic_torch_save({**head, "config_hash": "another"}, tmp_path / "other_head.pt")
    _, good = checkpoint(tmp_path, "L3", "free")
    with pytest.raises(UserError, match="another target model"):
        mfa.main(mfa.parse_args(["--checkpoint", str(good), "--test_data", str(tmp_path / "test"),
                                 "--lm_head", str(tmp_path / "other_head.pt"), "--device", "cpu"]))


def test_input_states_target_feeds_the_targets_states(tmp_path):
    """An L5 fed the target's states (the live engine's roll-out) at its initial identity-like state."""
    tensors, weight, head = write_test_data(tmp_path / "test")
    adapter, ckpt = checkpoint(tmp_path, "L5", "teacher_forced")
    base = ["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"), "--lm_head", str(head),
            "--device", "cpu"]
    fed = mfa.main(mfa.parse_args([*base, "--input_states", "target", "--output_dir", str(tmp_path / "t")]))
    own = mfa.main(mfa.parse_args([*base, "--output_dir", str(tmp_path / "o")]))
    assert fed["input_states"] == "target" and own["input_states"] == "trained"
    with torch.no_grad():
        out = adapter(tensors["vl_hidden"].float(), tensors["vl_mask"])
    mask = tensors["vl_mask"]
    top1 = ((out @ weight.T).argmax(-1) == tensors["vl_tokens"])[mask].float().mean()
    assert fed["metrics"]["token_top1"] == pytest.approx(float(top1))


def test_model_hashes_reads_several_layouts():
    assert model_hashes({"models": MODELS}) == {"drafter": "egpt-hash", "target": "vl-hash"}
    assert model_hashes(MODELS) == {"drafter": "egpt-hash", "target": "vl-hash"}
    assert model_hashes({"drafter": "a", "target": "b"}) == {"drafter": "a", "target": "b"}
    assert model_hashes(None) == {}


def test_one_same_models_rule_for_every_stage():
    """Extraction (hash and dtype), training (train vs val) and evaluation (checkpoint vs data) share it."""
    fp16 = {"drafter": {"config_hash": "a", "dtype": "float16"}, "target": {"config_hash": "b", "dtype": "float16"}}
    bf16 = {"drafter": {"config_hash": "a", "dtype": "bfloat16"}, "target": {"config_hash": "b", "dtype": "float16"}}
    assert differing_models(fp16, bf16) == []
    assert differing_models(fp16, bf16, dtype=True) == ["drafter"]
    assert differing_models({"models": fp16}, {"drafter": "a", "target": "c"}) == ["target"]
    assert differing_models(fp16, {"target": "b"}) == []  # a role one record lacks does not count
    assert differing_models(None, fp16) == []


def test_quick_world_subprocess(quick_hidden, tmp_path):
    """The script end to end on the toy world's extracted test split (an untrained L5F)."""
    import hidden_data

    manifest = hidden_data.load_manifest(quick_hidden / "test")
    width = manifest["widths"]["target"]
    vocab = torch.load(quick_hidden / "vl_lm_head.pt", weights_only=True)["vocab_size"]
    adapter = create_adapter("L5F", width, drafter_dim=manifest["widths"]["drafter"], token_input=True,
                             vocab_size=vocab)
    save_adapter(tmp_path / "L5F" / "best_model.pt", adapter, pairs="teacher_forced",
                 data={"models": manifest["models"]})
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "measure_feature_acceptance.py"),
                           "--checkpoint", str(tmp_path / "L5F" / "best_model.pt"),
                           "--test_data", str(quick_hidden / "test"), "--lm_head", str(quick_hidden / "vl_lm_head.pt"),
                           "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "acceptance_metrics.json").read_text())
    m = result["metrics"]
    assert m["token_positions"] > 0 and 0 <= m["shifted_top1"] <= 1
    # L5F starts as h_target (zero output projection): same-position tokens are the target's own (up to
    # near-ties between the fp16 stored states and the fp32 states the tokens came from)
    assert m["token_top1"] >= 0.95
    assert "accepted drafts per iteration" in proc.stdout
    # its token input read the target's embeddings from the LM head file; the roll-out ran beside
    roll = result["drafting"]["rollout"]
    assert roll["live_iterations"] > 0 and 0 <= roll["live_accepted_per_iteration"] <= 5
    assert len(result["calibration"]["accept"]) == 20


# ----------------------------------------------------------------------------- hardening (issue 18)


def run_cli(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "measure_feature_acceptance.py"), *argv, "--device", "cpu"],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def only_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line, which must start its own line (no progress bar left open before it)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.split("\n") if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-2000:]
    return errors[0]


def test_manifest_counting_more_samples_than_a_chunk_holds_stops_naming_it(tmp_path):
    """The manifest says 4 samples for the last chunk, which holds 2: one line naming it, bar closed first."""
    write_test_data(tmp_path / "test")
    path = tmp_path / "test" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["chunks"][1]["num_samples"], manifest["num_samples"] = 4, 8
    path.write_text(json.dumps(manifest))
    _, ckpt = checkpoint(tmp_path, "L1", "free")
    args = ["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"), "--lm_head", str(tmp_path / "lm_head.pt"),
            "--output_dir", str(tmp_path / "o"), "--batch_size", "2"]
    with pytest.raises(UserError, match=r"chunk_s000_00001\.pt holds 2 samples but the manifest says 4"):
        mfa.main(mfa.parse_args([*args, "--device", "cpu"]))
    assert "chunk_s000_00001.pt holds 2 samples" in only_error_line(run_cli(*args, cwd=tmp_path))


def test_checkpoint_of_another_width_is_blamed_not_the_head(tmp_path):
    write_test_data(tmp_path / "test")
    wide = create_adapter("L1", D + 8, dropout=0.0)
    save_adapter(tmp_path / "wide.pt", wide, pairs="free", data={"models": MODELS})
    with pytest.raises(UserError) as err:
        mfa.main(mfa.parse_args(["--checkpoint", str(tmp_path / "wide.pt"), "--test_data", str(tmp_path / "test"),
                                 "--lm_head", str(tmp_path / "lm_head.pt"), "--device", "cpu"]))
    assert str(err.value).startswith(f"{tmp_path / 'wide.pt'} expects drafter width {D + 8}") and "lm_head" not in \
        str(err.value)


def test_manifest_without_widths_and_inconsistent_head_are_one_line(tmp_path):
    write_test_data(tmp_path / "test")
    _, ckpt = checkpoint(tmp_path, "L1", "free")
    args = ["--checkpoint", str(ckpt), "--test_data", str(tmp_path / "test"), "--lm_head", str(tmp_path / "lm_head.pt"),
            "--output_dir", str(tmp_path / "o")]
    head = torch.load(tmp_path / "lm_head.pt", weights_only=True)
    atomic_torch_save({**head, "hidden_dim": D + 8}, tmp_path / "lm_head.pt")  # records a width its weight lacks
    assert "records vocab" in only_error_line(run_cli(*args, cwd=tmp_path))
    atomic_torch_save(head, tmp_path / "lm_head.pt")
    path = tmp_path / "test" / "manifest.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "widths"}))
    assert "records no state widths" in only_error_line(run_cli(*args, cwd=tmp_path))
