"""The shipped MetaSchedule databases (data only): installed as `abc_tvm.tuning_logs`, so
`abc_tvm.tuning.shipped_logs` finds them through the package in a wheel or a checkout."""
