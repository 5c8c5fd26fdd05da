"""`distplan run`: launch a plan with an engine, measure it, verify the prediction."""
