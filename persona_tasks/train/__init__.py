"""Preference training of the LLM labeller: preference groups, the groupwise DPO loss, trainers, the model registry.

Modules: ``loss`` (Plackett-Luce DPO), ``groups`` (preference groups from published runs), ``trainer`` (the arms on
trl + peft), ``registry`` (versions, promotion gate, promote / rollback), ``pipeline`` (what the CLI and the retrain
DAG call). docs/training.md explains the whole stage. torch, trl and peft load only when a module needs them.
"""
