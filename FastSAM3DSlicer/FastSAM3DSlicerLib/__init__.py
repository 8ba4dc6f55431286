"""Qt-free logic of the FastSAM3D Slicer module (runs with slicer-core, without the app)."""
