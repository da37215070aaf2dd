"""gptevo evolve's outputs: the --json schema (keys and types pinned here), the --html page (parses,
one <svg> per chart, self-contained), the command line, the measurement worker, the claims' rules and
the shipped quality data."""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import fields
from html.parser import HTMLParser

import pytest

from gptevo.cli import main
from gptevo.config import ModelConfig
from gptevo.errors import FormatError, GptevoError
from gptevo.evolve import claims, report
from gptevo.evolve.ladder import ladder, step_by_id
from gptevo.evolve.measure import measure_in_this_process, measure_step
from gptevo.evolve.quality import load_quality

TOP = {"schema": str, "scale": dict, "backend": (str, type(None)), "context": int, "decode_tokens": int,
       "threads": (int, type(None)), "steps": list, "claims": list, "quality": dict}
SCALE = {"name": str, "about": str, "vocab_size": int, "hidden_size": int, "num_layers": int, "num_heads": int,
         "head_dim": int, "kv_heads": int, "context": int, "window": int, "num_experts": int,
         "experts_per_token": int, "expert_width": int}
STEP = {"id": str, "title": str, "parent": (str, type(None)), "branch": bool, "section": (str, type(None)),
        "change": str, "diff": dict, "diff_text": str, "errata": list, "note": str, "config": dict,
        "computed": dict, "measured": dict, "quality": dict, "claims": list}
COMPUTED = ("params_total", "params_active", "params_mlp", "params_mlp_active", "params_norms",
            "kv_bytes_per_token", "kv_bytes_at_context", "flops_per_token", "weight_bytes_per_token",
            "weight_bytes", "weight_bytes_bf16")
NUM_OR_NONE = (int, float, type(None))
MEASURED = {"status": str, "note": str, "backend": (str, type(None)), "prefill_tok_s": NUM_OR_NONE,
            "decode_tok_s": NUM_OR_NONE, "peak_rss_bytes": NUM_OR_NONE, "model_peak_bytes": NUM_OR_NONE,
            "build_s": NUM_OR_NONE, "warmup_s": NUM_OR_NONE}
QUALITY = {"status": str, "heldout_loss": NUM_OR_NONE, "heldout_loss_std": NUM_OR_NONE, "heldout_ppl": NUM_OR_NONE,
           "heldout_loss_2x": NUM_OR_NONE, "seeds": int, "per_seed": list, "trained_like": (str, type(None))}
CLAIM = {"id": str, "step": str, "section": str, "quote": str, "kind": str, "scope": str, "claimed": str,
         "ours": str, "ours_value": (float, type(None)), "verdict": str, "note": str, "errata": list}
QSUMMARY = {"available": bool, "scale": (str, type(None)), "sizes": (dict, type(None)), "seeds": list,
            "tokens_per_run": (int, type(None)), "eval_tokens": (int, type(None)),
            "total_train_cpu_s": NUM_OR_NONE, "note": str}
CHART_IDS = ["parameters", "kv_cache", "speed", "quality"]


def _in_process(scale, step_id, backend, context, decode_tokens):
    return measure_in_this_process(step_by_id(ladder(scale), step_id).config, backend, context, decode_tokens)


@pytest.fixture(scope="module")
def measured():
    """The tiny ladder measured on the reference (in this process, to keep the test fast)."""
    return report.build("tiny", backend="reference", context=16, decode_tokens=2, measure_fn=_in_process)


def _keys(obj: dict, spec: dict, where: str):
    assert set(obj) == set(spec), f"{where}: keys {sorted(set(obj) ^ set(spec))} differ"
    for k, t in spec.items():
        assert isinstance(obj[k], t) and not (t in (int, NUM_OR_NONE) and isinstance(obj[k], bool)), \
            f"{where}.{k} = {obj[k]!r}"


def check_schema(r: dict, measured_ok: bool):
    r = json.loads(json.dumps(r, allow_nan=False))          # JSON round trip, no NaN/inf
    _keys(r, TOP, "report")
    assert r["schema"] == "gptevo.evolve/1"
    _keys(r["scale"], SCALE, "scale")
    _keys(r["quality"], QSUMMARY, "quality")
    assert [s["id"] for s in r["steps"]] == [s.id for s in ladder(r["scale"]["name"])]
    config_fields = {f.name for f in fields(ModelConfig)}
    for s in r["steps"]:
        _keys(s, STEP, s["id"])
        assert set(s["config"]) == config_fields
        assert set(s["computed"]) == set(COMPUTED)
        assert all(isinstance(v, int) and v >= 0 for v in s["computed"].values())
        _keys(s["measured"], MEASURED, s["id"] + ".measured")
        assert s["measured"]["status"] == ("ok" if measured_ok else "skipped")
        if measured_ok:
            for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "model_peak_bytes"):
                assert s["measured"][k] > 0 or k == "model_peak_bytes" and s["measured"][k] >= 0
        _keys(s["quality"], QUALITY, s["id"] + ".quality")
        assert s["quality"]["status"] in ("ok", "missing")
    ids = {s["id"] for s in r["steps"]}
    for c in r["claims"]:
        _keys(c, CLAIM, c["id"])
        assert c["step"] in ids and c["kind"] in ("computed", "measured", "quality", "erratum")
        assert c["scope"] in ("scale", "20b")
        assert c["verdict"] in ("agrees", "disagrees", "inconclusive", "not measured")
        assert c["id"] in next(s for s in r["steps"] if s["id"] == c["step"])["claims"]


def test_json_schema_with_measurements(measured):
    check_schema(measured, measured_ok=True)
    assert measured["backend"] == "reference" and measured["context"] == 16
    # computed figures of the config round trip through JSON
    again = report.config_from_dict(json.loads(json.dumps(measured["steps"][-3]["config"])))
    assert again == ladder("tiny")[-3].config


def test_cli_json_without_measuring(capsys):
    out = io.StringIO()
    assert main(["evolve", "--scale", "tiny", "--no-measure", "--json"], stdout=out, stderr=io.StringIO()) == 0
    r = json.loads(out.getvalue())
    check_schema(r, measured_ok=False)
    assert r["backend"] is None and r["context"] == 32           # half of the tiny scale's 64 positions


def test_cli_table(capsys):
    out = io.StringIO()
    assert main(["evolve", "--scale", "20b", "--no-measure"], stdout=out, stderr=io.StringIO()) == 0
    text = out.getvalue()
    assert "scale 20b" in text and "mxfp4" in text and "qk_norm <gqa" in text
    assert "DISAGREES" in text and "8.0x smaller KV cache" in text


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(text)
    p.close()
    return p.tags


def test_html_has_one_svg_per_chart_and_no_outside_references(measured, tmp_path):
    pytest.importorskip("matplotlib", reason="the report extra (gptevo[report]) is not installed")
    from gptevo.evolve.html import CHARTS, write_html

    path = tmp_path / "evolve.html"
    write_html(measured, str(path))
    tags = _parse(path.read_text(encoding="utf-8"))
    assert [t for t, _ in tags].count("svg") == len(CHART_IDS) == len(CHARTS)
    assert [a["id"] for t, a in tags if t == "figure"] == [f"chart-{c}" for c in CHART_IDS]
    assert not [t for t, _ in tags if t in ("script", "link", "img", "iframe")]
    assert not [a for _, a in tags if "src" in a]
    assert sum(1 for t, a in tags if t == "tr" and a.get("class") in ("main", "branch")) == len(measured["steps"])


def test_cli_html_without_measurements(tmp_path):
    pytest.importorskip("matplotlib", reason="the report extra (gptevo[report]) is not installed")
    path = tmp_path / "r.html"
    err = io.StringIO()
    assert main(["evolve", "--scale", "tiny", "--no-measure", "--html", str(path)], stdout=io.StringIO(),
                stderr=err) == 0
    text = path.read_text(encoding="utf-8")
    assert [t for t, _ in _parse(text)].count("svg") == len(CHART_IDS)
    assert "not measured at this scale" in text
    assert f"wrote {path}" in err.getvalue()


def test_html_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    path = tmp_path / "r.html"
    err = io.StringIO()
    assert main(["evolve", "--scale", "tiny", "--html", str(path)], stdout=io.StringIO(), stderr=err) == 2
    assert "pip install 'gptevo[report]'" in err.getvalue() and "--html" in err.getvalue()
    assert not path.exists()
    assert "[evolve]" not in err.getvalue()                       # failed before measuring anything


def test_html_into_a_missing_folder(measured, tmp_path):
    pytest.importorskip("matplotlib", reason="the report extra (gptevo[report]) is not installed")
    from gptevo.evolve.html import write_html

    with pytest.raises(GptevoError, match="does not exist"):
        write_html(measured, str(tmp_path / "nope" / "r.html"))


@pytest.mark.parametrize("argv, words", [
    (["--context", "0"], "--context must be a positive integer"),
    (["--decode-tokens", "-1"], "--decode-tokens must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--backend", "no-such-backend"], "no-such-backend"),
])
def test_bad_arguments(argv, words):
    err = io.StringIO()
    assert main(["evolve", "--scale", "tiny", *argv], stdout=io.StringIO(), stderr=err) == 2
    assert words in err.getvalue()


def test_context_beyond_a_step_skips_only_that_measurement():
    calls = []

    def stub(scale, step_id, backend, context, decode_tokens):
        calls.append(step_id)
        return {"error": "stub measurement"}

    r = report.build("tiny", backend="reference", context=100, decode_tokens=2, measure_fn=stub)
    by = {s["id"]: s["measured"] for s in r["steps"]}
    assert calls == ["gpt_oss", "mxfp4"]               # YaRN: 64 x 32 positions; every other step holds 64
    assert by["gpt2"]["status"] == "skipped" and "exceed this step's 64 positions" in by["gpt2"]["note"]
    assert by["gpt_oss"] == dict(by["gpt_oss"], status="error", note="stub measurement")


def test_measure_worker_process():
    r = measure_step("tiny", "mxfp4", "reference", context=8, decode_tokens=2, threads=1)
    assert set(r) >= {"prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "model_peak_bytes", "backend"}
    assert r["backend"] == "reference" and r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > r["model_peak_bytes"]
    bad = measure_step("tiny", "no_such_step", "reference", context=8, decode_tokens=2)
    assert "no ladder step 'no_such_step'" in bad["error"]


# -- claims --------------------------------------------------------------------------------------------
def _q(per_seed):
    m = sum(per_seed) / len(per_seed)
    sd = math.sqrt(sum((x - m) ** 2 for x in per_seed) / (len(per_seed) - 1))
    return {"heldout_loss": m, "heldout_loss_std": sd, "heldout_loss_per_seed": per_seed}


def test_decisive_difference_rule():
    # both seeds lower by 0.10; spreads 0.01 and 0.02 -> sqrt(0.0005) = 0.022 < 0.10: decisive
    diff, sure = claims.decisive(_q([5.00, 5.02]), _q([5.10, 5.12]))
    assert diff == pytest.approx(-0.10) and sure
    # signs disagree: not decisive whatever the size
    assert not claims.decisive(_q([5.00, 5.30]), _q([5.10, 5.20]))[1]
    # same sign but smaller than the spread: not decisive
    diff, sure = claims.decisive(_q([5.00, 5.20]), _q([5.05, 5.25]))
    assert diff == pytest.approx(-0.05) and not sure


@pytest.mark.parametrize("gpt2, no_dropout, verdict", [
    (100.0, 115.0, "agrees"),          # +15%: the claimed gain
    (100.0, 112.0, "agrees"),          # gain 0.12 is within 25% of 0.15
    (100.0, 110.0, "disagrees"),       # gain 0.10 is not
    (100.0, 99.0, "disagrees"),
    (100.0, None, "not measured"),
])
def test_measured_claims_compare_the_gain(gpt2, no_dropout, verdict):
    rows = {"gpt2": {"measured": {"decode_tok_s": gpt2}}, "no_dropout": {"measured": {"decode_tok_s": no_dropout}}}
    claim = next(c for c in claims.CLAIMS if c.id == "dropout_speed")
    assert claim.check(claims.Context(rows, {}, None, 16))[2] == verdict


def test_computed_claims_on_facts(measured):
    by = {c["id"]: c for c in measured["claims"]}
    # gpt-oss-20b: 64 query heads, 8 KV heads -> 8x, not the seed's 6x (erratum E7)
    assert by["gqa_kv_20b"]["ours_value"] == 8.0 and by["gqa_kv_20b"]["verdict"] == "disagrees"
    assert by["gptoss_params"]["ours_value"] == pytest.approx(20.914757184)
    assert by["gptoss_params"]["verdict"] == "disagrees"
    assert by["gptoss_active"]["ours_value"] == pytest.approx(3.608307264)
    assert by["rmsnorm_params"]["ours_value"] == 0.5 and by["rmsnorm_params"]["verdict"] == "agrees"
    # 41.83 GB all-bf16 / 13.76 GB with MXFP4 experts (spec/calculators.md)
    assert by["mxfp4_memory_20b"]["ours_value"] == pytest.approx(41.83 / 13.76, rel=2e-3)
    assert by["mxfp4_16gb"]["verdict"] == "agrees"


# -- the shipped quality data ------------------------------------------------------------------------
def test_quality_data_is_shipped_for_every_step():
    data = load_quality()
    assert data is not None, "gptevo/data/evolve/quality.json is missing (tools/evolve_train.py writes it)"
    assert data["scale"] == "small" and len(data["seeds"]) >= 2
    steps = data["steps"]
    assert set(steps) == {s.id for s in ladder("small")}
    for sid, e in steps.items():
        assert len(e["heldout_loss_per_seed"]) == len(data["seeds"])
        assert all(math.isfinite(v) and 0 < v < math.log(4096) + 1 for v in e["heldout_loss_per_seed"])
        if e["trained_like"] == sid:
            assert e["gptevo_check"] < 1e-4, sid          # gptevo's logits = the trained torch model's
    assert steps["pre_norm"]["heldout_loss_per_seed"] == steps["no_dropout"]["heldout_loss_per_seed"]
    assert steps["mxfp4"]["quantized_after_training"] and steps["mxfp4"]["gptevo_check"] < 1e-4
    assert steps["mxfp4"]["heldout_loss_per_seed"] != steps["gpt_oss"]["heldout_loss_per_seed"]


def test_malformed_quality_data_names_the_field(tmp_path):
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"schema": 1, "steps": {"gpt2": {"heldout_loss": "low"}}}))
    with pytest.raises(FormatError, match="steps.gpt2.heldout_loss"):
        load_quality(p)
    p.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_quality(p)
