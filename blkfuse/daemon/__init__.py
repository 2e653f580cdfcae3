"""The mount's process: its life, the pyfuse3 operations, the control file, the trace."""
