"""The rule engine: state, rules per event, active set, checks, breakpoints. Pure: no FUSE, no /proc."""
