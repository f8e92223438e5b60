"""Every read the CLI and metrics make, in plain portable SQL."""
