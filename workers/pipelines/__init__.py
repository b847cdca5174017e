"""One module per pipeline kind, each with check_inputs and run."""
