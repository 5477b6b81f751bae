"""Media I/O: one writer per video format, frontend-rule readers, workflow metadata, Load Video."""
