"""Measure the hardware (`distplan profile`): per-layer compute (compute.py), collectives and
overlap (comm.py), device facts and ceilings (facts.py), least-squares fits (fit.py), and the
run that ties them into a planner.core.profile.Profile (run.py). Heavy imports stay inside modules."""
