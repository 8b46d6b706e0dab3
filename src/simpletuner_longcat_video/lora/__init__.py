"""LoRA files in the three key formats (``formats``) and the export command (``export``)."""
