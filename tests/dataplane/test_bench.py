"""The data plane benchmark's in-process part, small: commit + sign timed against real forwards."""
from consortium import dataplane_bench, standalone
from consortium.layers import even_split
from consortium.models import resolve_model


def test_commit_share_measures_every_stage():
    r = dataplane_bench.commit_share(resolve_model(None), even_split(30, 3), 4, 1, standalone.PROMPT)
    assert r["tokens"] == 4 and r["forward_ms_per_token"] > 0 and r["commit_sign_ms_per_token"] > 0
    assert 0 < r["share_of_token_time"] < 1 and len(r["per_stage_share"]) == 3
    assert all(0 < s < 1 for s in r["per_stage_share"])
