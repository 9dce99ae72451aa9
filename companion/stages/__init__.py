"""One module per pipeline stage: a small async Protocol and its real adapter."""
