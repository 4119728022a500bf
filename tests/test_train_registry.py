"""Model registry: the promotion gate refuses a worse model (objective, truthfulness, fallback rate), promotion and
rollback are audited and move the pointer the daily labelling reads, and load_causal_lm merges the promoted adapter
(a real LoRA adapter on a tiny local Llama model directory, real DuckDB)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from persona_tasks.config import load_settings  # noqa: E402
from persona_tasks.train import registry as R  # noqa: E402
from persona_tasks.warehouse import connect  # noqa: E402

CURRENT = {"objective": 0.70, "truthfulness": 0.90, "fallback_rate": 0.02}


@pytest.fixture()
def env(tmp_path):
    """Settings with a tiny Llama saved as the labelling model, and a LoRA adapter trained on nothing but random
    (non-zero) weights, so that merging it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from persona_tasks.labelling.model import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    s = load_settings(warehouse=tmp_path / "wh" / "warehouse.duckdb", models_dir=tmp_path / "models", threads=1)
    s.labelling = s.labelling.model_copy(update={"model_path": model_dir, "device": "cpu"})
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    return s, adapter, tok


def _register(s, con, version, adapter, base, candidate):
    R.register(s, con, version=version, arm="groupwise", base_model=base, adapter_dir=adapter, group_count=5,
               metrics={"heldout": {"candidate": candidate, "current": CURRENT}}, actor="test")
    decision = R.gate(s, candidate, CURRENT)
    R.record_gate(con, version, decision, actor="test")
    return decision


def test_gate_refuses_worse_models_and_records_the_reason(env):
    s, adapter, _ = env
    s.training = s.training.model_copy(update={"min_objective_gain": 0.01})
    worse = [
        ({"objective": 0.705, "truthfulness": 0.95, "fallback_rate": 0.0}, "gain +0.0050 below"),
        ({"objective": 0.80, "truthfulness": 0.85, "fallback_rate": 0.0}, "truthfulness dropped"),
        ({"objective": 0.80, "truthfulness": 0.95, "fallback_rate": 0.05}, "fallback rate rose"),
        ({"objective": None, "truthfulness": 0.95, "fallback_rate": 0.0}, "candidate has no held-out objective"),
    ]
    with connect(s) as con:
        for n, (cand, why) in enumerate(worse):
            d = _register(s, con, f"v-worse-{n}", adapter, "base@1", cand)
            assert not d.passed and why in d.reason
            row = R.get_version(con, f"v-worse-{n}")
            assert row["status"] == "rejected" and why in row["reason"]
            assert json.loads(row["metrics"])["gate"]["passed"] is False
            with pytest.raises(R.RegistryError, match="not promotable"):
                R.promote(s, con, f"v-worse-{n}", actor="test")
        assert R.promoted_version(con) is None and R.read_pointer(s) is None
        # a by-hand override needs a reason, and is audited as such
        with pytest.raises(R.RegistryError, match="--reason"):
            R.promote(s, con, "v-worse-0", actor="alice", force=True)
        R.promote(s, con, "v-worse-0", actor="alice", force=True, reason="incident 42: try it")
        audit = con.execute("SELECT action, version, actor, reason FROM training.model_audit "
                            "WHERE action = 'promote'").fetchall()
        assert audit == [("promote", "v-worse-0", "alice", "incident 42: try it")]
        assert R.get_version(con, "v-worse-0")["promoted_by"] == "alice"
    # the same gate with the margin met passes
    better = {"objective": 0.72, "truthfulness": 0.90, "fallback_rate": 0.02}
    assert R.gate(s, better, CURRENT).passed


def test_promote_rollback_and_daily_loading_of_the_promoted_adapter(env):
    from persona_tasks.labelling.model import load_causal_lm

    s, adapter, tok = env
    base_model, _, base_version = load_causal_lm(s)
    assert "+" not in base_version  # nothing promoted yet
    good = {"objective": 0.75, "truthfulness": 0.92, "fallback_rate": 0.0}
    with connect(s) as con:
        assert _register(s, con, "v1", adapter, base_version, good).passed
        assert _register(s, con, "v2", adapter, base_version, good).passed
        R.promote(s, con, "v1", actor="dag")
        assert R.read_pointer(s)["version"] == "v1"
        R.promote(s, con, "v2", actor="bob")
        assert R.get_version(con, "v1")["status"] == "retired"
        assert R.promoted_version(con)["version"] == "v2"
        # the adapter files live under models_dir/adapters/<version>
        assert (s.models_dir / "adapters" / "v2" / "adapter_config.json").is_file()

    model, _, version = load_causal_lm(s)
    assert version == f"{base_version}+v2"
    ids = tok("searched: espresso grinder", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_model(ids).logits)  # the adapter is merged in
    # no adapter for the training's base model, and none when use_promoted is off
    assert load_causal_lm(s, adapter=False)[2] == base_version
    s2 = s.model_copy(update={"training": s.training.model_copy(update={"use_promoted": False})})
    assert load_causal_lm(s2)[2] == base_version

    with connect(s) as con:
        assert R.rollback(s, con, actor="carol", reason="bad personas")["version"] == "v1"
        assert R.read_pointer(s)["version"] == "v1"
        assert R.rollback(s, con, actor="carol") is None  # v1 was promoted over the base model
        assert R.read_pointer(s) is None and R.promoted_version(con) is None
        with pytest.raises(R.RegistryError, match="nothing to roll back"):
            R.rollback(s, con, actor="carol")
        actions = [r[0] for r in con.execute("SELECT action FROM training.model_audit ORDER BY acted_at").fetchall()]
        assert actions.count("rollback") == 2 and actions.count("promote") == 2
    assert load_causal_lm(s)[2] == base_version
    # a promoted adapter of another base model is not applied
    with connect(s) as con:
        _register(s, con, "v3", adapter, "another-base@0", good)
        R.promote(s, con, "v3", actor="dag")
    assert load_causal_lm(s)[2] == base_version


def test_models_cli_lists_refuses_promotes_and_rolls_back(env, monkeypatch, capsys):
    from persona_tasks import cli

    s, adapter, _ = env
    with connect(s) as con:
        _register(s, con, "v-bad", adapter, "base@1", {"objective": 0.60, "truthfulness": 0.9, "fallback_rate": 0.0})
        _register(s, con, "v-good", adapter, "base@1", {"objective": 0.80, "truthfulness": 0.9, "fallback_rate": 0.0})
    monkeypatch.setenv("PERSONA_ETL_WAREHOUSE", str(s.warehouse))
    monkeypatch.setenv("PERSONA_ETL_MODELS_DIR", str(s.models_dir))
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "v-bad  rejected" in out and "v-good  candidate" in out and "uses: the base model" in out
    assert cli.main(["models", "promote", "v-bad", "--actor", "eve"]) == 2
    assert "not promotable" in capsys.readouterr().err
    assert cli.main(["models", "promote", "v-good", "--actor", "eve"]) == 0
    assert R.read_pointer(s)["version"] == "v-good"
    assert cli.main(["models", "rollback", "--actor", "eve", "--reason", "test"]) == 0
    assert "the base model" in capsys.readouterr().out and R.read_pointer(s) is None
    with connect(s) as con:
        rows = con.execute("SELECT action, version, previous, actor FROM training.model_audit "
                           "WHERE action IN ('promote', 'rollback') ORDER BY acted_at").fetchall()
    assert rows == [("promote", "v-good", None, "eve"), ("rollback", None, "v-good", "eve")]
