"""Orchestration on Ray: the coordinator (driver) actor, per-site Ray Train worker groups,
and the parameter-averaging actor. Uses both the planning and the training layers."""
