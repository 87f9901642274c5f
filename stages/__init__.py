"""The application: the Typer CLI and one module per DVC stage. Wires `pipeline` and `extractors`."""
