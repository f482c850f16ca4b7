"""The data plane benchmark's in-process part, small: commit + sign timed against real forwards."""
from consortium import dataplane_bench, standalone
from consortium.layers import even_split
from consortium.models import resolve_model


def test_commit_share_measures_every_stage():
    r = dataplane_bench.commit_share(resolve_model(None), even_split(30, 3), 4, 1, standalone.PROMPT)
    assert r["tokens"] == 4 and r["forward_ms_per_token"] > 0 and r["commit_sign_ms_per_token"] > 0
    assert 0 < r["share_of_token_time"] < 1 and len(r["per_stage_share"]) == 3
    assert all(0 < s < 1 for s in r["per_stage_share"])


def test_tls_bench_times_both_transports_with_real_activations():
    from consortium import tls_bench

    r = tls_bench.run(None, rounds=1, calls=2, log=lambda s: None)
    assert set(r["median_ms"]) == {"tls", "plaintext"}
    assert all(v > 0 for t in r["median_ms"].values() for v in t.values())
    assert r["resend_bytes"] > tls_bench.PROMPT_ROWS * 576 * 4   # 32 rows of 576 float32 travelled
    assert "tls/plain" in tls_bench.summary(r)
