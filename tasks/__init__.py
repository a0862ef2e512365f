"""Stage machinery of stackwise: spec, store, feature files, training, assembly, Prefect tasks."""
