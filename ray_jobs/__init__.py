"""Ray glue for localcl: CLI, validated configs, Ray Train/Tune/Jobs entry points."""
