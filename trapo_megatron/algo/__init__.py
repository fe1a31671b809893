"""TRAPO algorithm core: objectives, advantages, aggregation, micro-group schedule (plain torch/python)."""
