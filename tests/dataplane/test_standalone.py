"""Test Case v1 end to end: three node-agent processes on loopback, baseline, audits, a kill."""
from pathlib import Path

import pytest

from consortium import cli, standalone

MAX_TOKENS = 24


def check_common(r):
    assert r["exact_match"], (r["baseline"]["tokens"], r["distributed"]["tokens"])
    a = r["audits"]
    assert a["total"] > 0 and a["mismatch"] == 0 and a["fraud"] == 0
    assert a["passed"] + a["passed_within_tolerance"] == a["total"]
    assert a["unjudged"] == 0 and a["total"] == a["selected"], a["unjudged_reasons"]   # every selected unit judged
    assert a["superseded"] == 0
    assert r["false_fraud"] == 0
    assert r["session_restarts"] == 0
    assert r["receipts"]["count"] > 0 and r["receipts"]["verified"] == r["receipts"]["count"]
    for m in ("Forward", "LoadStage", "Audit", "Health"):
        assert r["rpc"][m]["count"] > 0 and r["rpc"][m]["bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0, 16, 20, MAX_TOKENS - 1])
def test_kill_stage_1(kill_at, tmp_path):
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=1, kill_at=kill_at,
                                          report_dir=str(tmp_path) if kill_at == 20 else None))
    check_common(r)
    f = r["failover"]
    assert f["injected"] and f["completed"] and f["killed_node"] == "N2" and f["backup_node"] == "N0"
    # The backup rebuilt exactly the positions stage 1 had done before the kill, by replay.
    expected_replay = 0 if kill_at == 0 else r["prompt_tokens"] + kill_at - 1
    assert f["replayed_rows"] == expected_replay
    assert r["counters"][1]["replayed_rows"] == expected_replay
    if kill_at:   # the replay recomputed every row N2 committed: the same bits here
        check = f["events"][0]["replay_check"]
        assert check["verdicts"] == {"Passed": check["rows"]} and check["disputed"] == 0, check
    assert r["success"]
    if kill_at == 20:
        # N0, the backup, loaded stage 1's layers when the session started (warm backups).
        assert any(p["stage"] == 1 and p["node"] == "N0" for p in f["prepared"]), f["prepared"]
        assert {p.name for p in tmp_path.iterdir()} >= {"report.json", "summary.md", "latency.png", "agents"}
        # The agents' logs land in the report folder; their temporary folder is gone.
        assert r["agent_logs"] == str(tmp_path / "agents")
        assert sorted(p.name for p in (tmp_path / "agents").iterdir()) == ["N0.log", "N1.log", "N2.log"]
    else:
        assert r["agent_logs"] is None


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_kill_first_or_final_stage(stage):
    """The final stage's backup replays the prompt batch and then one row per token in one call,
    committing the logits at each batch end; the first stage's backup replays token ids."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=stage, kill_at=20))
    check_common(r)
    f = r["failover"]
    assert f["injected"] and f["completed"] and f["stage"] == stage
    assert f["replayed_rows"] == r["counters"][stage]["replayed_rows"] == r["prompt_tokens"] + 19
    assert r["success"]


@pytest.mark.slow
@pytest.mark.parametrize("from_state", [False, True], ids=["full-replay", "from-state"])
def test_a_cheater_no_audit_drew_is_caught_by_its_backups_replay(from_state):
    """Audits off: the cheating stage-1 node is killed at token 20, and its backup's replay of the
    stage recomputes every row it committed. Where they disagree, a third node audits both sides;
    its verdicts quarantine the cheater (with a proof of each Fraud row) and the session rewinds,
    ending with the baseline's tokens. The same with audits from window states, whose window audits
    once held the dispute's single positions until the session's end, and nobody was convicted."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=1, kill_at=20, faulty_stage=1,
                                          fault="cheap-quant", audit_probability=0.0, audit_from_state=from_state))
    check = r["failover"]["events"][0]["replay_check"]
    assert check["verdicts"].get("Fraud", 0) >= 1 and check["disputed"] >= 1, check
    assert r["audits"]["total"] == check["dispute_audits"] == 8   # four positions, each side's row
    assert {(a["node"], a["verifier"]) for a in r["audits"]["units"]} == {("N2", "N1"), ("N0", "N1")}
    assert r["exact_match"] and r["fault"]["caught"] and r["quarantined"] == ["N2"] and r["false_fraud"] == 0
    assert r["fraud_proofs"] and all(p["holds"] and p["node"] == "N2" for p in r["fraud_proofs"]), r["fraud_proofs"]
    assert r["success"]


@pytest.mark.slow
def test_a_cheating_backup_cannot_frame_the_node_it_replaces():
    """N0, the backup of every stage, cheats on stage 2 (it replays stage 1 with its cheat too);
    honest N2 is killed at token 10. N0's replay disagrees with every row N2 committed: a third
    node (N1) audits both sides, clears N2 and convicts N0, whose rollback ends the session with
    the baseline's tokens. Taken on N0's word alone, N2 had been quarantined."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=1, kill_at=10, faulty_stage=2,
                                          fault="replay"))
    check = r["failover"]["events"][0]["replay_check"]
    assert check["disputed"] >= 1 and check["dispute_audits"] == 8, check
    disputes = [a for a in r["audits"]["units"] if a["verifier"] == "N1" and a["stage"] == 1]
    assert {a["verdict"] for a in disputes if a["node"] == "N2"} == {"Passed"}
    assert r["quarantined"] == ["N0"] and r["false_fraud"] == 0 and r["exact_match"] and r["success"]


@pytest.mark.slow
def test_a_lying_verifier_is_caught_through_the_agent_processes():
    """N0's agent runs with --audit-fault random: every audit it answers is random rows. Its Fraud
    verdicts are audited again on a third node (or, once N2 is killed and none is left, wait for the
    session's end) and overruled; N0 is quarantined, no honest worker is, the tokens are the baseline's."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=1, kill_at=20, lying_verifier="N0"))
    liar = r["lying_verifier"]
    assert r["nodes"]["N0"]["audit_fault"] == "random"
    assert liar["caught"] and liar["overruled_verdicts"] >= 1 and liar["second_opinions"] >= 1, liar
    assert r["quarantined"] == ["N0"] and r["false_fraud"] == 0 and r["exact_match"]
    assert r["audits"]["fraud"] == 0 and not r["fraud_proofs"]
    assert r["success"]


@pytest.mark.slow
def test_signing_per_window_survives_a_final_stage_kill_and_catches_a_cheater():
    """Agents hold each window's rows uncommitted until it is complete. The killed final stage's held
    rows are replayed with logits and signed by its backup; a cheater's rows are judged whether or
    not their commitments had come, and every Fraud is still proven."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=2, kill_at=20, sign_per_window=True))
    check_common(r)
    assert r["failover"]["completed"] and r["success"]
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, faulty_stage=1, fault="noise-0.3",
                                          sign_per_window=True))
    assert r["exact_match"] and r["fault"]["caught"] and r["quarantined"] == ["N2"] and r["false_fraud"] == 0
    frauds = {a["position"] for a in r["audits"]["units"] if a["verdict"] == "Fraud"}
    assert frauds and {p["position"] for p in r["fraud_proofs"]} == frauds
    assert all(p["holds"] for p in r["fraud_proofs"])


@pytest.mark.slow
def test_a_final_stage_giving_tokens_its_rows_do_not_sample_is_proven_by_its_own_signature(tmp_path, capsys):
    """N0's agent runs with --fault wrong-token: its rows are honest, the tokens it gives are its
    rows' least likely ones, and it signs them with those rows as every final stage signs its
    tokens. Caught at its first token, rolled back, and proven by a SamplingFraudProof."""
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, faulty_stage=2,
                                          fault="wrong-token", report_dir=str(tmp_path)))
    assert r["exact_match"] and r["fault"]["caught"] and r["quarantined"] == ["N0"] and r["false_fraud"] == 0
    assert r["success"] and r["fault"]["rollbacks"][0]["reason"].startswith("stage 2 at")
    # Each lie it told before the rollback (the check runs beside the next step, so one or two).
    proofs = r["fraud_proofs"]
    assert 1 <= len(proofs) <= 2 and proofs[0]["position"] == r["prompt_tokens"] - 1, proofs
    assert all(p["holds"] and p["node"] == "N0" and p["proof"]["kind"] == "SamplingFraudProof" for p in proofs)
    # Its lies were rolled back: every token shown is one its backup signed for its row.
    assert r["receipts"]["tokens"] == {"signed": MAX_TOKENS, "unsigned": [], "contradicted": []}
    # Honest rows: no audit of N0 found anything.
    assert all(a["verdict"] in ("Passed", "PassedWithinTolerance") for a in r["audits"]["units"])
    assert cli.main(["verify-proof", str(tmp_path / "proofs" / proofs[0]["file"])]) == 0
    assert capsys.readouterr().out.startswith("HOLDS")


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["skip-layer", "cheap-quant", "noise-0.3", "replay", "random"])
def test_faulty_worker_caught_and_rolled_back(fault):
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, faulty_stage=1, fault=fault))
    assert r["exact_match"]
    assert r["fault"]["caught"] and r["quarantined"] == ["N2"]
    assert r["fault"]["rollbacks"] and r["distributed"]["rewinds"] >= 1
    assert r["false_fraud"] == 0
    a = r["audits"]   # every selected unit judged, or cut by the rollback before its audit
    assert a["selected"] == a["total"] + a["superseded"] and a["unjudged"] == 0, a["unjudged_reasons"]
    honest = [a for a in r["audits"]["units"] if a["node"] != "N2"]
    assert all(a["verdict"] in ("Passed", "PassedWithinTolerance") for a in honest)
    # Every Fraud verdict is proven, against the cheater only (a quarantine on Mismatches alone has none).
    frauds = {a["position"] for a in r["audits"]["units"] if a["verdict"] == "Fraud"}
    assert {p["position"] for p in r["fraud_proofs"]} == frauds
    assert all(p["holds"] and p["node"] == "N2" for p in r["fraud_proofs"]), r["fraud_proofs"]
    assert r["success"]


@pytest.mark.slow
def test_heterogeneous_gemma_accuses_no_honest_node():
    # N2 runs stage 1 with repacking off: its hashes differ from the verifiers' and the calibrated
    # tolerance of Gemma's stage 6-11 must take them as honest.
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, heterogeneous=True))
    assert r["nodes"]["N2"]["repack"] is False and r["model"]["architecture"] == "gemma3"
    odd = [a for a in r["audits"]["units"] if a["node"] == "N2"]
    assert odd and not any(a["verdict"] == "Fraud" for a in odd)
    assert any(a["verdict"] == "PassedWithinTolerance" for a in odd), [a["verdict"] for a in odd]
    assert r["false_fraud"] == 0 and r["quarantined"] == []
    assert r["audits"]["total"] == r["audits"]["selected"]   # the first run of a process once lost its last units
    assert r["success"]


@pytest.mark.slow
def test_hung_agent_is_caught_by_the_deadline():
    # SIGSTOP: the agent's socket stays open and nothing answers; only the RPC deadline can tell.
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=1, kill_at=20, hang=True,
                                          rpc_timeout_s=2.0))
    check_common(r)
    f = r["failover"]
    assert f["how"] == "SIGSTOP" and f["completed"] and f["backup_node"] == "N0"
    assert f["spike_ms"] >= 2000   # at least one deadline was waited out
    assert r["success"]


def test_agents_that_started_are_stopped_when_one_fails_to(tmp_path):
    """N1 is given an unknown fault kind and exits: the error says why, and the agents that did
    start are not left running."""
    bad = standalone.Options(plaintext=True, fault="no-such-fault")
    with pytest.raises(RuntimeError, match="node agent N1 exited") as e:
        standalone.Agents(tmp_path, bad, "N1")
    assert "no-such-fault" in str(e.value)
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_names(p, tmp_path)]
    assert left == []


def _cmdline_names(proc: Path, text) -> bool:
    try:
        return str(text).encode() in (proc / "cmdline").read_bytes()
    except OSError:   # gone meanwhile
        return False


def test_replay_batches_merge_decode_steps_only():
    from consortium.driver.session import replay_batches

    # a 5-row prompt at 0, then decode steps 5..14
    assert replay_batches([5] + [1] * 10, 0, 1, set()) == [5] + [1] * 10
    assert replay_batches([5] + [1] * 10, 0, 4, set()) == [5, 4, 4, 2]
    # the final stage: every audited position ends a batch (logits exist only there)
    assert replay_batches([5] + [1] * 10, 0, 4, {6, 12}) == [5, 2, 4, 2, 2]
    # starting mid-session, past the prompt
    assert replay_batches([1] * 7, 20, 32, {22}) == [3, 4]


def test_verifiers_merge_decode_steps_where_they_checked_and_stay_hash_equal():
    # The default: the driver sends the original batch shapes, and each verifier merges one-row steps
    # into batches of sizes it checked give the same bits on its stage (all of them, for Q4_1 here).
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None))
    check_common(r)
    assert r["hash_equal_rate"] == 1.0 and r["audits"]["passed"] == r["audits"]["total"]
    assert r["audits"]["merged_rows"] > 0 and r["audits"]["merge_check_cpu_ms"] > 0
    exact = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, audit_replay_rows=1))
    check_common(exact)
    assert exact["hash_equal_rate"] == 1.0 and exact["audits"]["merged_rows"] == 0
    assert exact["audits"]["merge_check_cpu_ms"] == 0


def test_audits_replaying_32_rows_at_a_time_stay_hash_equal(monkeypatch):
    # On this machine's CPU backend with the default model's Q4_1 weights, batches of up to 32 rows
    # compute each row as a one-row batch does: the cheaper replay must still match bit for bit.
    from consortium.driver import session

    shapes = []
    real = session.replay_batches
    monkeypatch.setattr(session, "replay_batches", lambda *a: shapes.append(real(*a)) or shapes[-1])
    r = standalone.run(standalone.Options(max_tokens=MAX_TOKENS, kill_stage=None, audit_replay_rows=32))
    check_common(r)
    assert r["hash_equal_rate"] == 1.0 and r["audits"]["passed"] == r["audits"]["total"]
    assert 0 < r["audits"]["audit_over_generation"] < 10
    # decode steps were merged (the first replay starts with the prompt's own batch)
    assert any(n > 1 for n in shapes[0][1:]) or any(n > 1 for sizes in shapes[1:] for n in sizes), shapes


@pytest.mark.slow
def test_audits_from_window_states_replay_whole_windows_alone_through_a_failover():
    """--audit-from-state: half the windows of each stage audited whole, each replayed from the signed
    states of the windows before it; stage 1 killed at token 20, so later windows' states are the
    backup's."""
    r = standalone.run(standalone.Options(max_tokens=64, kill_stage=1, kill_at=20, audit_probability=0.5,
                                          audit_from_state=True))
    a = r["audits"]
    assert r["exact_match"] and r["failover"]["completed"] and r["success"] and r["false_fraud"] == 0
    assert a["mismatch"] == a["fraud"] == 0 and a["passed"] + a["passed_within_tolerance"] == a["total"] > 0
    # The backup's keys and values are the failed node's bit for bit, even where it also audits its
    # own layers (each sequence has a KV cache of its own; a shared one laid its rows out otherwise).
    fs = a["from_state"]
    assert fs["windows"] >= 3 and fs["state_differs"] == fs["state_within_tolerance"] == 0, fs
    # Whole windows: an audited position's window-mates are audited too.
    w = fs["state_window"]
    assert w == 4   # the default, apart from the receipt window of 16
    windows = {(a["stage"], a["position"] // w) for a in r["audits"]["units"]}
    assert r["audits"]["total"] >= w * len(windows) - w * 3   # the last, open window of each stage may be short
    assert a["audit_over_generation"] < 2, a["audit_over_generation"]


@pytest.mark.slow
def test_audits_from_window_states_cost_a_fraction_of_full_replays():
    """Without a failover every window's state matches bit for bit, and replaying windows instead of
    every earlier position costs well under generating (full replays cost about as much)."""
    r = standalone.run(standalone.Options(max_tokens=64, kill_stage=None, audit_probability=0.5,
                                          audit_from_state=True))
    check_common(r)
    fs = r["audits"]["from_state"]
    assert fs["windows"] >= 3 and fs["state_differs"] == 0, fs
    assert r["hash_equal_rate"] == 1.0
    assert r["audits"]["audit_over_generation"] < 0.8, r["audits"]["audit_over_generation"]


@pytest.mark.slow
def test_audits_from_window_states_across_kernel_paths_compare_states_by_value():
    """N2 (repacking off) writes keys and values other than its verifiers' would: its window states
    are compared by value against the stage's calibrated state limit and stay trusted."""
    r = standalone.run(standalone.Options(max_tokens=64, kill_stage=None, heterogeneous=True, audit_probability=0.5,
                                          audit_from_state=True))
    fs = r["audits"]["from_state"]
    assert fs["state_within_tolerance"] >= 1 and fs["state_differs"] == 0, fs
    assert fs["worst_relative_l2"] > 0, fs   # compared by value, within the stage's limit
    odd = [a for a in r["audits"]["units"] if a["node"] == "N2"]
    assert odd and {a["verdict"] for a in odd} <= {"Passed", "PassedWithinTolerance"}
    assert r["false_fraud"] == 0 and r["success"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["skip-layer", "cheap-quant", "noise-0.3"])
def test_audits_from_window_states_catch_a_faulty_worker(fault):
    """A skip-layer cheater's states fit no honest stage, a cheap-quant one's differ from the
    verifier's, a noisy one's are honest but its rows are not: caught each way, rolled back."""
    r = standalone.run(standalone.Options(max_tokens=48, kill_stage=None, faulty_stage=1, fault=fault,
                                          audit_probability=0.5, audit_from_state=True))
    assert r["exact_match"] and r["fault"]["caught"] and r["quarantined"] == ["N2"] and r["false_fraud"] == 0
    honest = [a for a in r["audits"]["units"] if a["node"] != "N2"]
    assert all(a["verdict"] in ("Passed", "PassedWithinTolerance") for a in honest)
    assert r["success"]
