"""LoRA files as users hold them (kohya/A1111, diffusers/PEFT), merged into a loaded pipeline's weights and
taken out again bit for bit, without reloading the checkpoint."""
