"""The module's Qt side beside the Widget: slice-view capture (slice_views) and the install
flow's dialogs (install_host). A package, not a .py beside FastSAM3DSlicer.py: Slicer's module
factory loads every .py in a module directory as a module of its own."""
