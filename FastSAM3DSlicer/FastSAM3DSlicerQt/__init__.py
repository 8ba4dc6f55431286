"""The module's Qt side beside the Widget: the Setup and Prompts sections' slots
(setup_panel, prompts_panel: mixed into the Widget), slice-view capture (slice_views), the
Masking section (masking) and the install flow's dialogs (install_host). A package, not .py
files beside FastSAM3DSlicer.py: Slicer's module factory loads every .py in a module directory
as a module of its own."""
