"""The device-level training core (never imports Ray): stack_data (cells on the device), loop (a
stack through its solver's plan), stack (what a stack is), saved_maps (maps on disk, prediction),
evaluation (final scores on test cells), worker (a worker's job over its maps), device."""
