"""Distillation: Model A taught by the shipped ensemble (the views both see, the teacher bank, the
student's loss)."""
