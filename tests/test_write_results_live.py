"""RESULTS.md's live section from a benchmark result: the prompt-lookup row, the per-configuration ties
beside the target alone's, and the lossless line naming a configuration over the tie margin."""

from __future__ import annotations

import json
from pathlib import Path

import write_results as wr


def _config(kind: str, speedup: float, vs_hf: float | None, tokens_per_verify: float | None,
            ties: int = 0, passed: bool = True, **drafting: object) -> dict:
    spread = {"median": speedup, "min": speedup - 0.05, "max": speedup + 0.05}
    return {"speedup": spread, "ms_per_answer": 10.0, "tokens_per_verify": tokens_per_verify,
            "speedup_vs_hf_generate": None if vs_hf is None else {"median": vs_hf, "min": vs_hf, "max": vs_hf},
            "drafting": {"kind": kind, **drafting},
            "lossless": {"outputs_checked": 40, "numeric_tie_count": ties, "target_ties": 1, "max_ties": 3,
                         "passed": passed, "numeric_ties": []}}


def _result(failures: list[str]) -> dict:
    return {"num_samples": 12, "repeats": 3, "device": "cpu", "max_new_tokens": 50, "gamma_decode": 5,
            "gamma_prefill": 16, "temperature": 0.0, "command": "python benchmark_e2e_wallclock.py ...",
            "reference_profile": None, "lossless_checked": True, "lossless_outputs_checked": 200,
            "numeric_tie_count": 6, "tie_margin": {"fraction": 0.01, "minimum": 2},
            "lossless_failures": failures, "lossless_passed": not failures,
            "configs": {"target": _config("target", 1.0, 1.1, 1.0, ties=1),
                        "hf_generate": _config("hf_generate", 0.9, 1.0, None),
                        "prompt_lookup[K3,N2]": _config("prompt_lookup", 0.78, 0.86, 1.12, num_tokens=3, max_ngram=2),
                        "prompt_lookup[K5,N2]": _config("prompt_lookup", 0.81, 0.90, 1.13, num_tokens=5, max_ngram=2),
                        "decode[B1]": _config("decode", 1.26, 1.4, 2.1, ties=4, passed=False, draft_stop="fixed")}}


def test_live_section_has_the_prompt_lookup_row_and_the_ties(tmp_path: Path) -> None:
    (tmp_path / "e2e").mkdir()
    failure = "decode[B1]: 4 numeric ties in 40 outputs, the target alone 1, at most 3 allowed"
    (tmp_path / "e2e" / "e2e_wallclock.json").write_text(json.dumps(_result([failure])))
    page = wr.Page(tmp_path / "RESULTS.md")
    wr.live_section(page, tmp_path)
    text = "\n".join(page.lines)
    lookup = wr.prompt_lookup_text(_result([]))
    assert lookup is not None and lookup in text
    assert "`prompt_lookup[K5,N2]` at 0.81x (0.76-0.86) the target alone and 0.90x (0.90-0.90)" in lookup
    assert "2 (K, N) points timed" in lookup and "`decode[B1]`, at 1.26x" in lookup
    assert "4 (1) / 3 FAILED" in text and "| 1 (1) / 3 " in text
    assert "max(2, 0.01 x its checked outputs)" in text
    assert f"FAILED (numeric ties beyond the margin): {failure}" in text and "but for 6 numeric ties" in text
    assert wr.lossless_text({**_result([]), "lossless_checked": False}) == "NOT checked (sampling run)"
    assert wr.prompt_lookup_text({"configs": {"target": _config("target", 1.0, None, 1.0)}}) is None
