"""The ground: data types passed between stages and their file formats (model, cluster, job, profile, prediction,
plan, calibration, published references), errors and safe file IO. Imports nothing else of distplan."""
