"""Everything about the model: finding blocks, splitting, emulator bundles, plug-in and export."""
