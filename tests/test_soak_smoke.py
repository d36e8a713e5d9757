"""The soak's 30-second smoke version (the 10-minute soak runs outside CI: python -m bench.soak --seconds 600):
mixed valid and bad traffic at 8 clients against the reference score.py; every answer is the expected one for its
kind, no connection is dropped, and the run reports memory per worker."""

from __future__ import annotations

from bench import soak


def test_soak_smoke(colors_model):
    result = soak.soak(30, clients=8, model_dir=colors_model, say=lambda line: None)
    assert result["unexpected"] == {} and result["dropped"] == 0 and result["ok"]
    _, expected = soak.requests()
    kinds = {key.rsplit(" ", 1)[0] for key in result["totals"]}
    assert kinds == set(expected)  # every kind of request was sent and answered
    assert not any(key.endswith((" 500", " 502", " 503", " 504")) for key in result["totals"])
    assert len(result["windows"]) == 3 and all(w["rss_mb"] for w in result["windows"])
