"""The batch lifecycle: one state machine, one place that changes status."""
